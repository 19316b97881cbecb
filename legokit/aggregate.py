"""Aggregation of heterogeneous LoRA updates: HeteAgg (LEGO step 4) and the baselines it is compared with.

One API: every aggregator takes the clients' updates as a ``list[ClientUpdate]`` and returns
``dict[str, Tensor]`` (module name -> dense ΔW_g in LLM coordinates); the six of them share one signature
``(updates, previous=None, uncovered="keep")`` and are registered in :data:`AGGREGATORS` (names in
``legokit.names.AGGREGATOR_NAMES``; look one up with :func:`get_aggregator`). They are pure functions:
nothing touches a model. Notation per module: client ``k`` sends LoRA factors ``A_k`` (r_k, in),
``B_k`` (out, r_k) with scaling ``s_k``, so ``ΔW_k = s_k · B_k A_k`` (out, in), its keep-mask ``M_k``
(bool, out x in) and a weight ``n_k`` (samples, or 1.0 for uniform); ``p_k = n_k / Σ n``.

Which delta each aggregator averages:

==============  =============================================  ========================================
aggregator      result                                         coordinates no client owns
==============  =============================================  ========================================
heteagg         Σ n_k M_k ΔW_k / Σ n_k M_k  (owner mean)       previous value ("keep") or 0 ("zero")
heterofl        heteagg with every n_k = 1 (count-normalised)  same
fedavg_delta    Σ n_k M_k ΔW_k / Σ n_k  (pruned zeros dilute)  0
fedavg (FedIT)  s · (Σ p_k B_k)(Σ p_k A_k), equal ranks only   mask-agnostic: no such notion
flora           Σ p_k s_k B_k A_k, via stacked factors         mask-agnostic
flexlora        Σ p_k s_k B_k A_k, products averaged           mask-agnostic
==============  =============================================  ========================================

The mask-aware rules use ``M_k ⊙ ΔW_k``: that is the update the client actually applied (its effective
weight is ``W_k + M_k ⊙ s B_k A_k``); when training keeps the update inside the mask, the product outside
it never touched the loss. The factor-based baselines average raw factors / products as the original
methods do, so whatever the product holds outside a client's mask reaches the LLM; structured clients
are expanded with zeros, so their products are already zero outside the kept rows/columns. ``flora`` and
``flexlora`` give the same dense ΔW_g; they differ at broadcast time (FLoRA sends the stacked factors,
FlexLoRA re-factors ΔW_g by SVD back to each client's rank ``r_k``), which the round loop does.
``local`` and ``centralized`` are references run by the round loop, not aggregators.

Validation happens before any computation and raises :class:`LegokitError` naming the module, the client
and the shapes. Computation is float32, vectorised over clients, one module at a time (memory
O(clients x one module)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from legokit.names import AGGREGATOR_NAMES, REFERENCE_MODES, UNCOVERED_RULES
from legokit.utils import LegokitError


@dataclass
class ClientUpdate:
    """One client's LoRA update in LLM coordinates.

    ``factors[name] = (A, B)`` with A (r_k, in) and B (out, r_k); ``scaling = alpha / r_k``;
    ``masks[name]`` the client's bool keep-mask (out, in), required for every factor module (extra mask
    modules are ignored, so a Block's full ``masks`` mapping can be passed as is); ``weight = n_k``.
    """

    client: str
    factors: dict[str, tuple[Tensor, Tensor]]
    scaling: float
    masks: Mapping[str, Tensor]
    weight: float = 1.0

    def __post_init__(self) -> None:
        # Cheap checks only: lazy masks are not unpacked here, the aggregators check their contents.
        if not math.isfinite(float(self.scaling)):
            raise LegokitError(f"client {self.client!r}: scaling must be finite, got {self.scaling!r}")
        missing = [name for name in self.factors if name not in self.masks]
        if missing:
            raise LegokitError(f"client {self.client!r}: no mask for module(s) {missing}; every factor "
                               "module needs the client's keep-mask (all-True for a dense client)")
        for name in self.factors:
            _check_factors(self.factors[name], name, self.client)

    def _get(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in self.factors:
            raise LegokitError(f"client {self.client!r} has no factors for module {name!r}; "
                               f"it carries {list(self.factors)}")
        return self.factors[name]

    def rank(self, name: str) -> int:
        """LoRA rank r_k of module ``name``."""
        return int(self._get(name)[0].shape[0])

    def delta(self, name: str) -> Tensor:
        """``scaling · B @ A`` in float32, (out, in), NOT masked (see :meth:`masked_delta`)."""
        A, B = self._get(name)  # (r, in), (out, r)
        return (B.detach().float() @ A.detach().to(B.device, torch.float32)).mul_(self.scaling)

    def masked_delta(self, name: str) -> Tensor:
        """``M_k ⊙ delta(name)``: the update the client applied to its SLM, (out, in) float32."""
        d = self.delta(name)
        return d.masked_fill_(~_check_mask(self.masks[name], name, repr(self.client), tuple(d.shape)), 0.0)


# (updates, previous global deltas or None, uncovered rule) -> {module: dense ΔW_g (out, in)}
Aggregator = Callable[[list[ClientUpdate], Mapping[str, Tensor] | None, str], dict[str, Tensor]]


# ----------------------------------------------------------------------------------------------- checks


def _check_uncovered(uncovered: str) -> None:
    if uncovered not in UNCOVERED_RULES:
        raise LegokitError(f"unknown uncovered rule {uncovered!r}: use one of {list(UNCOVERED_RULES)} "
                           "('keep' the previous global value, or set it to 'zero')")


def _check_weights(weights: Sequence[float], n: int, clients: Sequence[str]) -> list[float]:
    """Validate client weights; return them normalised to sum 1 (python floats, float64 sums)."""
    w = [float(x) for x in weights]
    if len(w) != n:
        raise LegokitError(f"got {len(w)} weights for {n} clients: pass one weight n_k per client")
    for k, x in enumerate(w):
        if math.isnan(x) or math.isinf(x) or x < 0:
            raise LegokitError(f"weight of client {clients[k]!r} is {x}: weights must be finite and >= 0")
    total = math.fsum(w)
    if total <= 0:
        raise LegokitError(f"all client weights are zero ({w}): at least one client needs weight > 0")
    return [x / total for x in w]


def _check_tensor(t: object, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise LegokitError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_mask(mask: object, name: str, who: str, shape: tuple[int, ...]) -> Tensor:
    mask = _check_tensor(mask, f"mask of module {name!r}, client {who}")
    if mask.dtype != torch.bool:
        raise LegokitError(f"mask of module {name!r}, client {who} has dtype {mask.dtype}: masks must be "
                           "bool (True = weight kept); convert with `mask.bool()` / `mask != 0`")
    if tuple(mask.shape) != shape:
        raise LegokitError(f"mask shape {tuple(mask.shape)} of module {name!r}, client {who} does not match "
                           f"its update's shape {shape} (out, in)")
    return mask


def _check_factors(pair: object, name: str, who: str) -> tuple[int, int, int]:
    """Check ``(A, B)``; return (out, in, r)."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise LegokitError(f"factors of module {name!r}, client {who!r} must be a pair (A, B)")
    A = _check_tensor(pair[0], f"A of module {name!r}, client {who!r}")
    B = _check_tensor(pair[1], f"B of module {name!r}, client {who!r}")
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise LegokitError(f"module {name!r}, client {who!r}: A {tuple(A.shape)} and B {tuple(B.shape)} "
                           "do not fit; expected A (r, in) and B (out, r) with the same rank r")
    return int(B.shape[0]), int(A.shape[1]), int(A.shape[0])


def _check_key_sets(key_lists: list[list[str]], who: Callable[[int], str]) -> list[str]:
    if not key_lists:
        raise LegokitError("no client updates to aggregate: pass at least one client")
    first = key_lists[0]
    for k, keys in enumerate(key_lists[1:], start=1):
        if set(keys) != set(first):
            only_0 = sorted(set(first) - set(keys))
            only_k = sorted(set(keys) - set(first))
            raise LegokitError(f"module keys differ between clients {who(0)} and {who(k)}: only in "
                               f"{who(0)}: {only_0}; only in {who(k)}: {only_k}")
    return list(first)


def _check_previous(previous: Mapping[str, Tensor] | None, name: str,
                    shape: tuple[int, ...]) -> Tensor | None:
    if previous is None or name not in previous:
        return None
    prev = _check_tensor(previous[name], f"previous global delta of module {name!r}")
    if tuple(prev.shape) != shape:
        raise LegokitError(f"previous global delta of module {name!r} has shape {tuple(prev.shape)}, "
                           f"the updates have {shape} (out, in)")
    return prev


def _check_updates(updates: Sequence[ClientUpdate]) -> tuple[list[str], list[float]]:
    """Validate ClientUpdates; return (module names, normalised weights p_k)."""
    if not updates:
        raise LegokitError("no client updates to aggregate: pass at least one client")
    for u in updates:
        if not isinstance(u, ClientUpdate):
            raise LegokitError(f"expected ClientUpdate objects, got {type(u).__name__}")
    clients = [u.client for u in updates]
    dupes = sorted({c for c in clients if clients.count(c) > 1})
    if dupes:
        raise LegokitError(f"duplicate client name(s) {dupes}: each update must come from a distinct client")
    names = _check_key_sets([list(u.factors) for u in updates], lambda k: repr(clients[k]))
    for name in names:
        shape = None
        for u in updates:
            out, inp, _ = _check_factors(u.factors[name], name, u.client)
            if shape is None:
                shape = (out, inp)
            elif (out, inp) != shape:
                A, B = u.factors[name]
                raise LegokitError(f"module {name!r}: client {u.client!r} has A {tuple(A.shape)}, "
                                   f"B {tuple(B.shape)} -> (out, in) = {(out, inp)}, client {clients[0]!r} "
                                   f"has {shape}")
            if name not in u.masks:
                raise LegokitError(f"client {u.client!r} has no mask for module {name!r}")
            _check_mask(u.masks[name], name, repr(u.client), shape)
            for label, t in zip("AB", u.factors[name], strict=True):
                if not bool(torch.isfinite(t).all()):
                    raise LegokitError(f"factor {label} of module {name!r}, client {u.client!r} has NaN/inf "
                                       "values: that client's training diverged; drop it or lower its lr")
    return names, _check_weights([u.weight for u in updates], len(updates), clients)


# ------------------------------------------------------------------------------------------------ kernels


def stack_updates(updates: Sequence[ClientUpdate], name: str) -> Tensor:
    """Dense ``s_k B_k A_k`` of every client, (K, out, in) float32, each written in place into one buffer."""
    A0, B0 = updates[0].factors[name]
    out = torch.empty((len(updates), B0.shape[0], A0.shape[1]), dtype=torch.float32, device=B0.device)
    for k, u in enumerate(updates):
        A, B = u.factors[name]  # (r, in), (out, r)
        torch.matmul(B.detach().to(out.device, torch.float32), A.detach().to(out.device, torch.float32),
                     out=out[k])
        out[k].mul_(u.scaling)
    finite = torch.isfinite(out).flatten(1).all(1)  # (K,): one read for all clients, not one per client
    if not bool(finite.all()):
        u = updates[int((~finite).nonzero()[0])]
        raise LegokitError(f"module {name!r}, client {u.client!r}: s·B@A overflows to inf although the "
                           "factors are finite; the update is too large to aggregate")
    return out


def stack_masks(masks: Sequence[Tensor], device: torch.device) -> Tensor:
    """The clients' masks of one module on ``device``, (K, out, in) bool."""
    return torch.stack([m.to(device) for m in masks])


def _weights(p: Sequence[float], updates: Sequence[ClientUpdate]) -> Tensor:
    """The client weights ``p`` as float32 ``(K,)`` where the first client's factors are, made once per call
    (one host-to-device copy per aggregation instead of one per module)."""
    first = next(iter(updates[0].factors.values()), None)  # (A, B) of some module, or None (no modules)
    return torch.tensor(p, dtype=torch.float32).to("cpu" if first is None else first[1].device)


def _owner_mean(D: Tensor, M: Tensor, w: Tensor, prev: Tensor | None, uncovered: str) -> Tensor:
    """HeteAgg on one module. D (K, out, in) float32 (overwritten), M (K, out, in) bool, w (K,) float32."""
    w = w.to(D.device)
    D.masked_fill_(~M, 0.0)  # M_k ⊙ ΔW_k
    num = torch.tensordot(w, D, dims=1)  # (out, in)  Σ n_k M_k ΔW_k
    den = torch.tensordot(w, M.to(torch.float32), dims=1)  # (out, in)  Σ n_k M_k
    covered = den > 0
    if uncovered == "keep" and prev is not None:
        fallback = prev.detach().to(D.device, torch.float32)
    else:
        fallback = torch.zeros_like(num)
    return torch.where(covered, num / torch.where(covered, den, torch.ones_like(den)), fallback)


def _masked_mean(D: Tensor, M: Tensor, w: Tensor) -> Tensor:
    """FedAvg of masked deltas on one module: Σ w_k M_k ΔW_k, (out, in). D is overwritten; w (K,) float32."""
    return torch.tensordot(w.to(D.device), D.masked_fill_(~M, 0.0), dims=1)


# ------------------------------------------------------------------------------------------ mask-aware


def heteagg(updates: list[ClientUpdate], previous: Mapping[str, Tensor] | None = None,
            uncovered: str = "keep") -> dict[str, Tensor]:
    """HeteAgg: ``ΔW_g[i,j] = Σ_k n_k M_k[i,j] ΔW_k[i,j] / Σ_k n_k M_k[i,j]`` where the denominator > 0.

    Args:
        updates: one :class:`ClientUpdate` per client; ``ΔW_k = u.scaling · B @ A``, masked here with
            ``u.masks``; ``n_k = u.weight`` (>= 0, not all zero). A coordinate owned only by zero-weight
            clients counts as uncovered.
        previous: previous global ``{module: ΔW (out, in)}`` for ``uncovered="keep"``; a missing module
            (or None) keeps 0.
        uncovered: ``"keep"`` (previous value) or ``"zero"`` where no client owns the coordinate.
    Returns:
        ``{module: ΔW_g (out, in) float32}``: every covered coordinate is the weighted mean of its owners.
        Computed one module at a time.
    """
    return _mask_aware(updates, previous, uncovered, unweighted=False)


def heterofl(updates: list[ClientUpdate], previous: Mapping[str, Tensor] | None = None,
             uncovered: str = "keep") -> dict[str, Tensor]:
    """HeteroFL: count-normalised, unweighted owner mean = :func:`heteagg` with every ``n_k = 1``.

    ``u.weight`` is ignored, except that it is validated.
    """
    return _mask_aware(updates, previous, uncovered, unweighted=True)


def fedavg_delta(updates: list[ClientUpdate], previous: Mapping[str, Tensor] | None = None,
                 uncovered: str = "keep") -> dict[str, Tensor]:
    """FedAvg of the applied deltas: ``Σ_k n_k (M_k ⊙ ΔW_k) / Σ_k n_k``, pruned zeros included.

    The masks make pruned coordinates contribute zeros, which is exactly the dilution HeteAgg avoids;
    with all-True masks this equals :func:`heteagg`. ``previous`` is ignored (uncovered coordinates get 0)
    and ``uncovered`` only validated. Returns ``{module: (out, in) float32}``.
    """
    return _dense_means(updates, uncovered, lambda name, D, w: _masked_mean(
        D, stack_masks([u.masks[name] for u in updates], D.device), w))


def _dense_means(updates: list[ClientUpdate], uncovered: str,
                 combine: Callable[[str, Tensor, Tensor], Tensor]) -> dict[str, Tensor]:
    """``{module: combine(module, D (K, out, in) float32, w (K,) float32)}`` for the mask-agnostic aggregators
    (validated updates and ``uncovered``, the client weights made once, one module's deltas at a time)."""
    names, p = _check_updates(updates)
    _check_uncovered(uncovered)
    w = _weights(p, updates)
    return {name: combine(name, stack_updates(updates, name), w) for name in names}


def _mask_aware(updates: list[ClientUpdate], previous: Mapping[str, Tensor] | None, uncovered: str,
                unweighted: bool) -> dict[str, Tensor]:
    names, p = _check_updates(updates)
    _check_uncovered(uncovered)
    if unweighted:
        p = [1.0 / len(updates)] * len(updates)
    w = _weights(p, updates)
    result = {}
    for name in names:
        A0, B0 = updates[0].factors[name]
        prev = _check_previous(previous, name, (int(B0.shape[0]), int(A0.shape[1])))
        D = stack_updates(updates, name)  # (K, out, in)
        result[name] = _owner_mean(D, stack_masks([u.masks[name] for u in updates], D.device), w, prev,
                                   uncovered)
    return result


# ---------------------------------------------------------------------------------------- factor-based


def fedavg_factors(updates: list[ClientUpdate]) -> dict[str, tuple[Tensor, Tensor]]:
    """FedIT factors: ``{module: (Σ p_k A_k (r, in), Σ p_k B_k (out, r))}``, scaling ``updates[0].scaling``.

    Only defined when every client has the same rank per module and the same scaling.
    """
    names, p = _check_updates(updates)
    scalings = [u.scaling for u in updates]
    if any(not math.isclose(s, scalings[0], rel_tol=1e-6) for s in scalings):
        listing = ", ".join(f"{u.client!r}: {u.scaling:g}" for u in updates)
        raise LegokitError(f"fedavg (FedIT) averages A and B separately and needs one LoRA scaling "
                           f"alpha/r, got {listing}; use 'flora', 'flexlora' or 'heteagg' instead")
    result = {}
    for name in names:
        ranks = [u.rank(name) for u in updates]
        if len(set(ranks)) > 1:
            listing = ", ".join(f"{u.client!r}: r={r}" for u, r in zip(updates, ranks, strict=True))
            raise LegokitError(f"fedavg (FedIT) needs equal LoRA ranks, module {name!r} has {listing}; use "
                               "'flora' or 'heteagg' for heterogeneous ranks")
        A = sum(pk * u.factors[name][0].detach().float() for pk, u in zip(p, updates, strict=True))
        B = sum(pk * u.factors[name][1].detach().float() for pk, u in zip(p, updates, strict=True))
        result[name] = (A, B)  # (r, in), (out, r)
    return result


def fedavg(updates: list[ClientUpdate], previous: Mapping[str, Tensor] | None = None,
           uncovered: str = "keep") -> dict[str, Tensor]:
    """FedIT: ``s · (Σ p_k B_k) @ (Σ p_k A_k)`` per module, (out, in) float32. Mask-agnostic.

    ``previous`` is ignored and ``uncovered`` only validated (the signature matches :data:`AGGREGATORS`).
    Raises LegokitError when ranks or scalings differ between clients.
    """
    _check_uncovered(uncovered)
    factors = fedavg_factors(updates)
    s = float(updates[0].scaling)
    return {name: (B @ A).mul_(s) for name, (A, B) in factors.items()}


def flora_factors(updates: list[ClientUpdate]) -> dict[str, tuple[Tensor, Tensor]]:
    """FLoRA stacking: ``{module: (A_stack (Σ r_k, in), B_stack (out, Σ r_k))}`` with scaling 1.

    ``B_stack = [p_1 s_1 B_1 | ... | p_K s_K B_K]`` and ``A_stack = [A_1; ...; A_K]``, so
    ``B_stack @ A_stack = Σ p_k s_k B_k A_k`` exactly, whatever the ranks.
    """
    names, p = _check_updates(updates)
    result = {}
    for name in names:
        A = torch.cat([u.factors[name][0].detach().float() for u in updates], dim=0)  # (Σr, in)
        B = torch.cat([u.factors[name][1].detach().float() * (pk * u.scaling)
                       for pk, u in zip(p, updates, strict=True)], dim=1)  # (out, Σr)
        result[name] = (A, B)
    return result


def flora(updates: list[ClientUpdate], previous: Mapping[str, Tensor] | None = None,
          uncovered: str = "keep") -> dict[str, Tensor]:
    """FLoRA: the exact ``Σ p_k s_k B_k A_k`` per module via :func:`flora_factors`; mask-agnostic.

    ``previous`` is ignored and ``uncovered`` only validated.
    """
    _check_uncovered(uncovered)
    return {name: B @ A for name, (A, B) in flora_factors(updates).items()}


def flexlora(updates: list[ClientUpdate], previous: Mapping[str, Tensor] | None = None,
             uncovered: str = "keep") -> dict[str, Tensor]:
    """FlexLoRA: average of the dense products ``Σ p_k s_k B_k A_k`` per module; mask-agnostic.

    Same dense result as :func:`flora`; FlexLoRA's per-client truncated SVD back to rank ``r_k`` happens at
    broadcast time in the round loop. ``previous`` is ignored and ``uncovered`` only validated.
    """
    return _dense_means(updates, uncovered, lambda name, D, w: torch.tensordot(w.to(D.device), D, dims=1))


AGGREGATORS: dict[str, Aggregator] = {
    "heteagg": heteagg,
    "fedavg": fedavg,
    "fedavg_delta": fedavg_delta,
    "heterofl": heterofl,
    "flora": flora,
    "flexlora": flexlora,
}
assert tuple(AGGREGATORS) == AGGREGATOR_NAMES, "legokit.names.AGGREGATOR_NAMES must list AGGREGATORS, in order"


def get_aggregator(name: str) -> Aggregator:
    """``AGGREGATORS[name]``, or a LegokitError listing the valid names."""
    if name in AGGREGATORS:
        return AGGREGATORS[name]
    if name in REFERENCE_MODES:
        raise LegokitError(f"{name!r} is a reference run by the round loop (no aggregation step), not an "
                           f"aggregator; aggregators are {list(AGGREGATORS)}")
    raise LegokitError(f"unknown aggregator {name!r}: use one of {list(AGGREGATORS)}")


# ---------------------------------------------------------------------------------- analysis helpers


def coverage(masks: list[Mapping[str, Tensor]], name: str) -> Tensor:
    """How many clients own each coordinate of module ``name``: int32 (out, in), values in [0, K]."""
    if not masks:
        raise LegokitError("no client masks given: pass at least one client")
    for k, m in enumerate(masks):
        if name not in m:
            raise LegokitError(f"client #{k} has no mask for module {name!r}")
    shape = tuple(_check_tensor(masks[0][name], f"mask of module {name!r}, client #0").shape)
    count = torch.zeros(shape, dtype=torch.int32, device=masks[0][name].device)  # (out, in)
    for k, m in enumerate(masks):
        count += _check_mask(m[name], name, f"#{k}", shape).to(count.device)
    return count


def update_norms(updates: list[ClientUpdate], masked: bool = True) -> dict[str, dict[str, float]]:
    """Frobenius norm per client and module: ``{client: {module: ‖M_k ⊙ ΔW_k‖_F}}`` (or unmasked)."""
    names, _ = _check_updates(updates)
    return {u.client: {name: float(torch.linalg.vector_norm(u.masked_delta(name) if masked
                                                              else u.delta(name)))
                       for name in names}
            for u in updates}


def cosine_matrix(updates: list[ClientUpdate], name: str | None = None, masked: bool = True) -> Tensor:
    """Pairwise cosine similarity of the flattened (masked) deltas, (K, K) float32, clients in input order.

    Over module ``name`` or, when None, over all modules concatenated (accumulated one module at a time).
    A client whose update is zero has NaN cosines (undefined).
    """
    names, _ = _check_updates(updates)
    if name is not None:
        if name not in names:
            raise LegokitError(f"module {name!r} is not in the updates; they carry {names}")
        names = [name]
    K = len(updates)
    gram = torch.zeros((K, K), dtype=torch.float64)
    for n in names:
        D = stack_updates(updates, n)  # (K, out, in)
        if masked:
            D.masked_fill_(~stack_masks([u.masks[n] for u in updates], D.device), 0.0)
        D = D.reshape(K, -1)  # (K, out*in)
        gram += (D @ D.T).double().cpu()
    norms = gram.diagonal().sqrt()  # (K,)
    cos = gram / torch.outer(norms, norms)  # 0/0 -> NaN for a zero update
    return cos.float()
