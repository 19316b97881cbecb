"""The DP owner mean: HeteAgg's per-weight mean of the owners' updates, with each client clipped and the sums noised.

What is clipped. HeteAgg adds up the masked products ``M_k ⊙ ΔW_k`` (``ΔW_k = s_k B_k A_k``) and divides by the
owner count; the broadcast then re-factors the mean by SVD. The sum is what the noise must hide, so the clipped
quantity is each client's contribution to that sum, not its LoRA factors (a bound on ``‖A‖`` and ``‖B‖`` bounds
``‖B A‖`` only loosely, and the noise lands on ``ΔW``): the change ``U_k = M_k ⊙ R ⊙ (ΔW_k − ΔW_0)`` of its
applied update over the round, all modules together, scaled to L2 norm at most ``clip``. ``ΔW_0`` is the adapter
every client started the round from (public: the server sent it), ``R`` the released weights (below).

The rule per weight, for the round's clients ``k`` and the released weights ``R``::

    ΔW_g = ΔW_0 + (Σ_k clip(U_k) + noise) / d        on R;   the uncovered rule (previous or 0) elsewhere

- ``central``: ``noise ~ N(0, (z C)^2)`` drawn by the server on every weight of ``R``; ``d = q · c`` with ``c``
  the weight's owner count over ALL clients and ``q`` the expected share of clients per round. The denominator
  is fixed (it does not depend on who took part, as in DP-FedAvg's fixed-denominator estimator), so dividing by
  it is post-processing of the noised sum; at ``q = 1`` with no failure it is HeteroFL's count.
- ``local``: each client adds ``N(0, (2 z C)^2)`` to its own clipped update on its owned weights of ``R``; the
  server divides by the weight's owners among the round's clients (participation is public in local DP).

Clients count uniformly under DP: a sample count is a property of a client's data, and weighting by it would
scale that client's sensitivity (``fed.weighting`` is not used; the report says ``weighting: uniform``).

Owner counts and noise. The noise that reaches a weight owned by ``c`` clients has std ``z C / (q c)`` in
central mode and ``2 z C / sqrt(c)`` in local mode (:func:`noise_std_by_owners`): the division that makes HeteAgg
an owner mean amplifies the noise ``K`` times on a weight one client owns, compared with one all ``K`` own; the
DP guarantee is the same everywhere (it is the sum's), the signal is not. The choice made: ``R`` holds only the
weights owned by at least ``privacy.min_owners`` clients (default 2), so a single-owner weight is never released
(it keeps its previous value) and no released weight gets more than ``z C / (2 q)``. ``min_owners: 1`` releases
all owned weights, amplified noise included.

Randomness: the noise is seeded from (run seed, round, module[, client]) so that a run, a resume and a test are
reproducible. That makes it predictable to whoever knows the seed: a deployment would draw it from a secret
source; the accounting is the same.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from legokit.aggregate import ClientUpdate, stack_masks, stack_updates
from legokit.privacy.accountant import PrivacyPlan
from legokit.privacy.exposure import owner_count
from legokit.utils import LegokitError


def noise_std_by_owners(plan: PrivacyPlan, clients: int) -> dict[int, float]:
    """The std of the noise that reaches a weight owned by ``c = 1..clients`` clients (all of them taking part)."""
    if plan.mode == "central":
        return {c: plan.noise_std / (plan.participation * c) for c in range(1, clients + 1)}
    return {c: plan.noise_std / math.sqrt(c) for c in range(1, clients + 1)}


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([k % 2**32 for k in key]).generate_state(1)[0]))


def clip_scales(norms: Sequence[float], clip: float) -> list[float]:
    """The factor each client's update is multiplied by: ``min(1, clip / norm)`` (1 for a zero update)."""
    return [1.0 if n <= clip else clip / n for n in norms]


class PrivateOwnerMean:
    """The DP owner mean of one run (see the module docstring), one round at a time.

    Args:
        plan: the resolved DP settings (``accountant.privacy_plan``).
        seed: the run's seed (the noise's).
    ``start_round`` takes the population's masks and computes the clip factors over all modules; ``combine`` then
    gives one module's ΔW_g.
    """

    def __init__(self, plan: PrivacyPlan, seed: int):
        if plan.mode not in ("central", "local"):
            raise LegokitError(f"PrivateOwnerMean needs privacy.mode central or local, got {plan.mode!r}")
        self.plan, self.seed = plan, seed
        self.population: list[Mapping[str, Tensor]] = []
        self.round, self.scales, self.norms = 0, [], []
        self._modules: dict[str, int] = {}

    def released(self, name: str) -> tuple[Tensor, Tensor]:
        """``(R, c)`` for module ``name``: the released weights (bool (out, in)) and the owner count over all
        clients (int32 (out, in))."""
        count = owner_count(self.population, name)
        return count >= self.plan.min_owners, count

    def _changes(self, updates: Sequence[ClientUpdate], name: str, base: Tensor, released: Tensor) -> Tensor:
        """``U_k`` of every client on module ``name`` before clipping: (K, out, in) float32."""
        D = stack_updates(updates, name)  # (K, out, in)  s_k B_k A_k
        D -= base.to(D.device, torch.float32)
        keep = stack_masks([u.masks[name] for u in updates], D.device) & released.to(D.device)  # (K, out, in)
        return D.masked_fill_(~keep, 0.0)

    def start_round(self, rnd: int, updates: Sequence[ClientUpdate], bases: Mapping[str, Tensor],
                    population: Sequence[Mapping[str, Tensor]]) -> dict:
        """Compute each client's clip factor from its update over every module of ``bases`` (the adapter the round
        started from, ``{module: ΔW_0 (out, in)}``); ``population``: the keep-mask mapping of every client that may
        take part (a block's ``masks``). Returns round metrics (pre-clip norms, how many clipped, the noise std)."""
        self.round, self.population = rnd, list(population)
        self._modules = {name: i for i, name in enumerate(bases)}
        sq = torch.zeros(len(updates), dtype=torch.float64)
        for name, base in bases.items():
            U = self._changes(updates, name, base, self.released(name)[0])
            sq += U.reshape(len(updates), -1).double().square().sum(1).cpu()
        self.norms = sq.sqrt().tolist()
        self.scales = clip_scales(self.norms, self.plan.clip)
        return {"dp_norms": self.norms, "dp_clipped": sum(s < 1 for s in self.scales),
                "dp_noise_std": self.plan.noise_std}

    def combine(self, updates: Sequence[ClientUpdate], name: str, base: Tensor, previous: Tensor | None,
                uncovered: str) -> Tensor:
        """ΔW_g of module ``name`` (out, in) float32 for the round ``start_round`` prepared."""
        if len(self.scales) != len(updates) or name not in self._modules:
            raise LegokitError(f"module {name!r}: start_round was not called for this round's {len(updates)} updates")
        R, count = self.released(name)
        U = self._changes(updates, name, base, R)  # (K, out, in)
        U *= torch.tensor(self.scales, dtype=torch.float32, device=U.device).view(-1, 1, 1)
        index, std = self._modules[name], self.plan.noise_std
        if self.plan.mode == "local":  # each client noises the owned released weights of its own update
            for k, u in enumerate(updates):
                own = u.masks[name].to(U.device) & R.to(U.device)
                gen = _generator(self.seed, self.round, index, zlib.crc32(u.client.encode()), 1)
                noise = torch.randn(U.shape[1:], generator=gen, dtype=torch.float32)
                U[k] += noise.to(U.device).mul_(std).masked_fill_(~own, 0.0)
            owners = stack_masks([u.masks[name] for u in updates], U.device).sum(0)  # (out, in) this round's
            denom, total = owners.to(torch.float32), U.sum(0)
        else:  # the server noises the sum on every released weight, divides by the fixed expected count
            noise = torch.randn(U.shape[1:], generator=_generator(self.seed, self.round, index, 0), dtype=torch.float32)
            total = U.sum(0) + noise.to(U.device).mul_(std).masked_fill_(~R.to(U.device), 0.0)
            denom = count.to(U.device, torch.float32) * self.plan.participation
        out = base.to(U.device, torch.float32) + total / denom.clamp_min(1e-12)
        fallback = (previous.to(U.device, torch.float32) if uncovered == "keep" and previous is not None
                    else torch.zeros_like(out))
        return torch.where(R.to(U.device) & (denom > 0), out, fallback)


def privacy_summary(plan: PrivacyPlan, exposure: Mapping) -> dict:
    """What ``results.json`` records of a DP run: the plan (epsilon spent at delta included), the noise std per
    owner count, and the share of weights released (owned by at least ``min_owners`` clients) by ``exposure``."""
    owners = list(exposure["owners"])
    return {**plan.to_dict(), "noise_std_by_owners": noise_std_by_owners(plan, len(owners) - 1),
            "released_share": float(sum(owners[plan.min_owners:]))}


def privacy_lines(results: Mapping) -> list[str]:
    """The printed summary's lines on exposure and privacy (none when ``results`` has neither)."""
    lines = []
    ex = results.get("exposure")
    if ex:
        sole = ", ".join(f"{c} {100 * s:.1f}%" for c, s in ex["sole"].items() if s > 0) or "none"
        lines.append(f"exposure: {100 * ex['owners'][1]:.1f}% of the weights have a single owner, whose update "
                     f"HeteAgg releases as sent (only-owner shares: {sole})")
    p = results.get("privacy")
    if p:
        eps = "inf (no noise)" if p["epsilon"] is None else f"{p['epsilon']:.2f}"
        lines.append(f"privacy: {p['mode']} DP, epsilon spent {eps} at delta {p['delta']:g} ({p['accountant']} "
                     f"accountant, {p['steps']} rounds, sampling rate {p['sample_rate']:g}); noise multiplier "
                     f"{p['noise_multiplier']:.3f}, clip {p['clip']:g}; weights released "
                     f"{100 * p['released_share']:.1f}% (owned by >= {p['min_owners']} clients)")
    return lines
