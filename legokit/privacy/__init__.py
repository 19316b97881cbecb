"""Privacy for LEGO's heterogeneous aggregation: what HeteAgg exposes, and client-level differential privacy.

- ``exposure``: for a block mix, the share of each module's weights owned by 1, 2, ... clients, and the weights
  only one client owns (HeteAgg sends that client's update on those weights to everyone, averaged over nobody).
- ``settings``: the ``privacy`` config section and its checks against the rest of the config.
- ``accountant``: epsilon at delta for a run (opacus' RDP / PRV accountants), and the noise a target epsilon needs.
- ``mechanism``: the clipped, noised owner mean that replaces HeteAgg's when ``privacy.mode`` is ``central`` or
  ``local`` (docs/privacy.md gives the reasoning; the module docstring the exact rule).

Importing the package loads nothing: ``settings`` is read by ``legokit.config``, which must stay light.
"""
