"""Epsilon at delta for a DP run, from opacus' accountants (RDP by default, PRV on request).

A LEGO round with ``privacy.mode`` on is one Gaussian mechanism over the clients' clipped updates:

- ``central``: the server noises the sum; each client takes part with probability ``q = sampled / num_clients``
  (``fed.sample_fraction``), so the run is ``fed.rounds`` steps of the sampled Gaussian mechanism at rate ``q``.
  legokit samples a fixed number of clients per round without replacement, where the accountants assume Poisson
  sampling: at ``q = 1`` (every client each round, as in the shipped profiles) the two are the same; below 1 the
  reported epsilon is the usual approximation of DP-FedAvg practice.
- ``local``: each client noises its own update; the server knows who took part, so there is no amplification by
  sampling (``q = 1``) and the bound counts every round (an upper bound for a client sampled in fewer).

The noise multiplier is the noise std over the L2 sensitivity of what is noised (``clip`` for a sum, ``2 clip``
for one client's update): exactly opacus' ``noise_multiplier``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from opacus.accountants import create_accountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from legokit.config import ExperimentConfig, sampled_count
from legokit.utils import LegokitError

Step = tuple[float, float, int]  # (noise multiplier, sample rate, steps): one phase of a run, as opacus' history


def privacy_spent(history: Sequence[Step], delta: float, accountant: str = "rdp",
                  orders: Iterable[float] | None = None) -> tuple[float, float | None]:
    """``(epsilon, best RDP order)`` spent by ``history`` at ``delta`` (the order is None for PRV).

    Args:
        history: phases ``(noise_multiplier, sample_rate, steps)`` run one after the other.
        delta: the target delta.
        accountant: ``"rdp"`` or ``"prv"``.
        orders: RDP orders to search (None: opacus' defaults); RDP only.
    """
    if accountant == "rdp":
        orders = list(orders) if orders is not None else None
        acc = create_accountant("rdp")
        acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
        with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, just looser
            warnings.simplefilter("ignore", UserWarning)
            eps, order = acc.get_privacy_spent(delta=delta, alphas=orders)
        return max(float(eps), 0.0), float(order)
    if orders is not None:
        raise LegokitError("RDP orders only apply to accountant='rdp'")
    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():  # PRV takes log(1 - q), -inf at q = 1, where it handles it
        warnings.simplefilter("ignore", RuntimeWarning)
        return max(float(acc.get_epsilon(delta=delta)), 0.0), None


def smallest_epsilon(delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The smallest epsilon the accountant can certify for ``steps`` steps at ``delta``: its value at opacus'
    largest noise multiplier (RDP's conversion to (epsilon, delta) has a floor set by its largest order)."""
    return privacy_spent([(MAX_SIGMA, sample_rate, steps)], delta, accountant)[0]


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to opacus' tolerance 0.01 in epsilon) whose run spends at most
    ``target_epsilon``; LegokitError naming the smallest reachable epsilon when the target is below it."""
    floor = smallest_epsilon(delta, sample_rate, steps, accountant)
    if target_epsilon <= floor + 0.01:
        raise LegokitError(f"privacy.target_epsilon={target_epsilon:g} cannot be reached in {steps} round(s) at "
                           f"delta={delta:g} with the {accountant} accountant: the smallest reachable epsilon is "
                           f"{floor:.3g}; ask for more than that, or raise privacy.delta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant))


@dataclass(frozen=True)
class PrivacyPlan:
    """A run's resolved DP settings and the epsilon it spends (``privacy_plan``).

    ``noise_std`` is the std of the Gaussian noise drawn per coordinate: on the server's sum (``central``) or on
    each client's update (``local``); ``sample_rate`` and ``steps`` are what the accountant was given.
    """

    mode: str
    clip: float
    noise_multiplier: float
    delta: float
    epsilon: float
    accountant: str
    sample_rate: float
    steps: int
    min_owners: int
    participation: float  # the expected share of clients in a round (the fixed denominator's factor)

    @property
    def sensitivity(self) -> float:
        return self.clip if self.mode == "central" else 2 * self.clip

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.sensitivity

    def to_dict(self) -> dict:
        """JSON-ready: epsilon is None (not infinity) when there is no noise."""
        d = {**asdict(self), "noise_std": self.noise_std, "weighting": "uniform"}
        return {**d, "epsilon": d["epsilon"] if math.isfinite(d["epsilon"]) else None}


def privacy_plan(cfg: ExperimentConfig) -> PrivacyPlan | None:
    """The DP plan of ``cfg`` (None when ``privacy.mode`` is ``none``): the noise multiplier (given, or computed
    from ``target_epsilon``) and the epsilon the run spends in ``fed.rounds`` rounds."""
    p, fed = cfg.privacy, cfg.fed
    if not p.enabled:
        return None
    participation = sampled_count(fed.sample_fraction, fed.num_clients) / fed.num_clients
    rate = participation if p.mode == "central" else 1.0
    if p.target_epsilon is not None:
        sigma = noise_for_epsilon(p.target_epsilon, p.delta, rate, fed.rounds, p.accountant)
    else:
        sigma = float(p.noise_multiplier)
    eps = privacy_spent([(sigma, rate, fed.rounds)], p.delta, p.accountant)[0] if sigma > 0 else float("inf")
    return PrivacyPlan(p.mode, p.clip, sigma, p.delta, eps, p.accountant, rate, fed.rounds, p.min_owners,
                       participation)
