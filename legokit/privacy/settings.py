"""The ``privacy`` config section: client-level differential privacy for the mask-aware aggregators.

``privacy: {mode: none | central | local, clip, noise_multiplier | target_epsilon, delta, accountant, min_owners}``.
``mode: none`` (the default) changes nothing: the run is the non-private one, number for number. The checks that
need other sections (the aggregator, the number of clients, the rounds) are in :func:`check_privacy`, which
``ExperimentConfig`` runs before any work; a ``target_epsilon`` is turned into a noise multiplier there, so an
unreachable one fails at load time with the smallest reachable epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from legokit.utils import LegokitError

PRIVACY_MODES = ("none", "central", "local")
ACCOUNTANTS = ("rdp", "prv")  # opacus.accountants mechanisms
# The owner means whose sums DP can protect: both become the count-normalised (uniform-weight) owner mean under DP.
DP_AGGREGATORS = ("heteagg", "heterofl")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise LegokitError(msg)


@dataclass
class PrivacyConfig:
    """Client-level DP for HeteAgg: each client's masked update clipped to ``clip``, Gaussian noise on the sums.

    ``central``: the server adds ``N(0, (noise_multiplier * clip)^2)`` to every released coordinate of the sum.
    ``local``: each client adds ``N(0, (noise_multiplier * 2 * clip)^2)`` to its own clipped update (two updates
    of norm <= clip differ by up to 2 clip). Give ``noise_multiplier`` or ``target_epsilon``, not both.
    ``min_owners``: a weight is released only when at least that many clients own it (see ``mechanism``).
    """

    mode: str = "none"
    clip: float = 0.01  # L2 bound on one client's round update, all modules together (masked ΔW, LLM coordinates)
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    min_owners: int = 2

    def __post_init__(self):
        _check(self.mode in PRIVACY_MODES, f"privacy.mode={self.mode!r} is unknown: use one of {PRIVACY_MODES}")
        _check(self.accountant in ACCOUNTANTS,
               f"privacy.accountant={self.accountant!r} is unknown: use one of {ACCOUNTANTS} (opacus' accountants)")
        _check(_number(self.clip) and self.clip > 0,
               f"privacy.clip={self.clip!r} must be a finite number > 0: the L2 norm each client's update is clipped "
               "to, e.g. 0.01")
        _check(_number(self.delta) and 0 < self.delta < 1,
               f"privacy.delta={self.delta!r} must be in (0, 1) and below 1/num_clients, e.g. 1e-5")
        _check(isinstance(self.min_owners, int) and not isinstance(self.min_owners, bool) and self.min_owners >= 1,
               f"privacy.min_owners={self.min_owners!r} must be an int >= 1 (1 releases every owned weight)")
        _check(self.noise_multiplier is None or self.target_epsilon is None,
               f"privacy.noise_multiplier={self.noise_multiplier} and privacy.target_epsilon={self.target_epsilon} "
               "are both set: give one (the other is computed by the accountant)")
        _check(self.noise_multiplier is None or (_number(self.noise_multiplier) and self.noise_multiplier >= 0),
               f"privacy.noise_multiplier={self.noise_multiplier!r} must be a finite number >= 0")
        _check(self.target_epsilon is None or (_number(self.target_epsilon) and self.target_epsilon > 0),
               f"privacy.target_epsilon={self.target_epsilon!r} must be a finite number > 0 (e.g. 8 or 1)")
        _check(self.mode == "none" or self.noise_multiplier is not None or self.target_epsilon is not None,
               f"privacy.mode={self.mode!r} needs privacy.target_epsilon (e.g. 8) or privacy.noise_multiplier")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def check_privacy(cfg) -> None:
    """The checks of ``cfg.privacy`` against the rest of ``cfg`` (an ``ExperimentConfig``); nothing when DP is off.

    Raises LegokitError for an aggregator DP does not support, ``delta >= 1/num_clients``, ``min_owners`` above
    the number of clients, or a ``target_epsilon`` the accountant cannot reach in ``fed.rounds`` rounds.
    """
    p, fed = cfg.privacy, cfg.fed
    if not p.enabled:
        return
    _check(fed.aggregator in DP_AGGREGATORS,
           f"privacy.mode={p.mode!r} does not support fed.aggregator={fed.aggregator!r}: it protects the owner-mean "
           f"sums of {list(DP_AGGREGATORS)} (the factor-based baselines and the references have no such sum); set "
           "fed.aggregator to one of them or privacy.mode=none")
    _check(p.delta < 1 / fed.num_clients,
           f"privacy.delta={p.delta:g} must be below 1/num_clients = {1 / fed.num_clients:g} (client-level DP: a delta "
           "that large allows releasing one client's update outright); use e.g. 1e-5")
    _check(p.min_owners <= fed.num_clients,
           f"privacy.min_owners={p.min_owners} exceeds fed.num_clients={fed.num_clients}: no weight would ever be "
           "released; use a value <= the number of clients (1 releases every owned weight)")
    from legokit.privacy.accountant import privacy_plan  # heavy (opacus imports torch): config loads stay light

    privacy_plan(cfg)  # a target epsilon below the reachable floor raises here, before any work
