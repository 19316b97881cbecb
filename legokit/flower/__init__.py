"""LEGO on Flower (flwr 1.42): the same rounds as ``legokit.federation``, with real clients.

- ``server_app``: the ServerApp (``legokit.flower.server_app:app``); ``strategy.FlowerStrategy`` runs
  ``legokit.federation.Federation``'s round loop with SuperNodes as its clients (no second loop, no second
  copy of the algebra).
- ``client_app``: the ClientApp (``legokit.flower.client_app:app``); runs ``client.local_update`` on the
  block and data partition its SuperNode's node config names.
- ``secagg``: rounds through Flower's own SecAgg+ (``SecAggClients``, the server sees only the sum; the
  clients' masked numerator and counts, the quantization and its error bound).
- ``messages``: what travels (adapter factors in peft naming; block ids, never masks).
- ``runconfig``: Flower's flat run config <-> ``ExperimentConfig``; the app's ``pyproject.toml``.
- ``deployment``: the deployment engine on loopback (``Deployment``: SuperLink + SuperNodes as processes,
  always cleaned up; ``deploy``: up, run, down).
- ``simulation``: the simulation engine in one process (``simulate``: Ray, or an in-process backend).
- ``processes``: running Flower's processes, for ``deployment`` and ``legokit flower node`` / ``run``
  (executables, environment, SuperLink health, process groups stopped with every descendant).
- ``cli``: ``legokit flower ...``.

Importing this package imports nothing heavy; import the submodule you need.
"""
