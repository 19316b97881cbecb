"""Aggregation analyses (notebook 03): every aggregator replayed on the same client updates, and what it kept.

The round loop keeps the last round's client updates (``LegoStrategy.last_results``, factors in LLM
coordinates). ``reaggregate`` replays every aggregator on those same updates, one module at a time, so
aggregators are compared on identical inputs without training again; ``aggregation_errors`` measures each
against an independent float64 owner mean (what HeteAgg computes; ``aggregator_detail`` gives one module's
matrices for a picture), ``energy_by_rank`` shows how much of an aggregate a rank-r broadcast keeps,
``coverage_table`` / ``update_norm_table`` describe the clients' masks and updates, ``block_update`` is the
global update as one block applies it, and ``apply_delta`` adds an update to a model and restores the
weights bit for bit afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from legokit.aggregate import AGGREGATORS, ClientUpdate, coverage, get_aggregator, update_norms
from legokit.models import layer_of
from legokit.slm import LinearView
from legokit.utils import LegokitError, progress_bar


class LazyDeltas(Mapping):
    """A read-only ``{module: tensor}`` whose values are computed on access by ``fn(module)``."""

    def __init__(self, names: Sequence[str], fn):
        self.names, self.fn = list(names), fn

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.fn(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def block_update(strategy, block_index: int) -> Mapping[str, Tensor]:
    """The strategy's global update as the block applies it: ``M ⊙ s·B_g A_g`` in the SLM's coordinates.

    Lazy, one module per access. Adding it to the block's base weights (:func:`apply_delta`) gives the
    same model as ``federation.block_model`` (adapter mode) without a LoRA layer recomputing the masked
    product in every forward.
    """
    adapter = strategy.broadcast.adapter_for(None)
    if adapter is None:
        raise LegokitError("this run has no global adapter (merge mode folds the update into the blocks, `local` "
                           "keeps one adapter per client): use block.model as is")
    factors, scaling = adapter
    block = strategy.blocks[block_index]
    masked = not (block.dense or block.structured)

    def local(name: str) -> Tensor:
        a, b = factors[name]  # (r_g, in), (out, r_g) in LLM coordinates
        d = (b @ a).mul_(scaling)  # (out, in)
        if masked:
            d.mul_(block.masks[name])
        return block.coords.shrink(name, d)

    return LazyDeltas(list(factors), local)


def client_masks(strategy) -> list[Mapping[str, Tensor]]:
    """Every client's keep-masks (its block's ``masks``), in client order."""
    return [strategy.blocks[i].masks for i in strategy.assignment]


def client_updates(strategy, results: Sequence, names: Sequence[str] | None = None) -> list[ClientUpdate]:
    """The ``ClientUpdate`` of each result, as the strategy aggregates them (``LegoStrategy.updates``).

    Args:
        strategy: the federation's ``legokit.strategy.LegoStrategy`` (blocks, assignment, weighting rule).
        results: ``ClientResult`` list (``strategy.last_results``).
        names: modules to carry (default: all).
    """
    if not results:
        raise LegokitError("no client results: run a round first (strategy.last_results is empty)")
    return strategy.updates(results, names)


class AggregatedDeltas(Mapping):
    """Lazy ``{module: ΔW_g}`` of one aggregator over fixed client updates; each access aggregates one module.

    ``previous`` = None: coordinates no client owns get 0 (the round-1 value under ``"keep"``).
    """

    def __init__(self, strategy, results: Sequence, aggregator: str, names: Sequence[str] | None = None,
                 previous: Mapping[str, Tensor] | None = None):
        self.strategy, self.results, self.name = strategy, list(results), aggregator
        self.fn = get_aggregator(aggregator)
        self.names = list(strategy.modules if names is None else names)
        self.previous = previous
        client_updates(strategy, self.results, self.names[:1])  # fail fast on empty results

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(name)
        updates = client_updates(self.strategy, self.results, [name])
        prev = None if self.previous is None or name not in self.previous else {name: self.previous[name]}
        return self.fn(updates, prev, self.strategy.cfg.fed.uncovered)[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def reaggregate(strategy, results: Sequence, names: Sequence[str],
                aggregators: Sequence[str] = tuple(AGGREGATORS)) -> dict[str, dict[str, Tensor]]:
    """Every aggregator applied to the same client updates: ``{aggregator: {module: ΔW_g (out, in)}}``.

    Keep ``names`` to a few modules (each dense delta is out x in float32); for a whole model use
    :class:`AggregatedDeltas`, which computes one module at a time.
    """
    return {a: dict(AggregatedDeltas(strategy, results, a, names)) for a in aggregators}


def owner_mean(updates: Sequence[ClientUpdate], name: str) -> Tensor:
    """Reference HeteAgg in float64, client by client: ``Σ n_k M_k ΔW_k / Σ n_k M_k``, 0 where nobody owns.

    Written independently of ``legokit.aggregate`` so it can check it. Returns (out, in) float64.
    """
    num = den = None
    for u in updates:
        A, B = u.factors[name]  # (r, in), (out, r)
        m = u.masks[name].to(torch.float64)
        d = u.scaling * (B.double() @ A.double())  # (out, in)
        num = u.weight * m * d if num is None else num + u.weight * m * d
        den = u.weight * m if den is None else den + u.weight * m
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def aggregation_errors(strategy, results: Sequence, aggregators: Sequence[str] = tuple(AGGREGATORS),
                       names: Sequence[str] | None = None, progress: bool = True) -> pd.DataFrame:
    """How far each aggregator's ΔW_g is from the exact sample-weighted owner mean, module by module.

    Columns: ``module, layer, kind, aggregator, rel_error`` (‖ΔW_a − ref‖_F / ‖ref‖_F), ``norm_ratio``
    (‖ΔW_a‖ / ‖ref‖), ``dilution`` (⟨ΔW_a, ref⟩ / ‖ref‖² over the coordinates owned by some but not all
    clients: 1 = the owners' mean, < 1 = shrunk towards the pruned zeros; NaN when every coordinate is
    owned by all or none), ``partial_fraction`` (share of such coordinates). ``ref`` = :func:`owner_mean`.
    """
    names = list(strategy.modules if names is None else names)
    fns = {a: get_aggregator(a) for a in aggregators}
    rows = []
    for name in progress_bar(names, desc="aggregation errors", disable=not progress, leave=False):
        updates = client_updates(strategy, results, [name])
        ref = owner_mean(updates, name)
        owners = sum(u.masks[name].to(torch.int32) for u in updates)  # (out, in)
        partial = (owners > 0) & (owners < len(updates))
        ref_norm = float(torch.linalg.vector_norm(ref))
        ref_p = ref[partial]
        for a, fn in fns.items():
            d = fn(updates, None, strategy.cfg.fed.uncovered)[name].double()
            dp = d[partial]
            denom = float(ref_p @ ref_p)
            rows.append({"module": name, "layer": layer_of(name), "kind": name.rsplit(".", 1)[-1],
                         "aggregator": a,
                         "rel_error": float(torch.linalg.vector_norm(d - ref)) / max(ref_norm, 1e-30),
                         "norm_ratio": float(torch.linalg.vector_norm(d)) / max(ref_norm, 1e-30),
                         "dilution": float(dp @ ref_p) / denom if denom > 0 else float("nan"),
                         "partial_fraction": float(partial.double().mean())})
    return pd.DataFrame(rows)


def aggregator_detail(strategy, results: Sequence, aggregator: str, module: str) -> dict:
    """One aggregator's ΔW_g on one module beside the exact owner mean (what ``widgets.aggregator_explorer`` draws).

    Returns:
        ``{"delta": ΔW_g (out, in) float64, "reference": owner_mean (out, in) float64, "coverage": int32
        (out, in) owners among the results' clients, "errors": that module's row of aggregation_errors}``.
    """
    if module not in strategy.modules:
        raise LegokitError(f"unknown module {module!r}: use one of strategy.modules (e.g. {strategy.modules[0]!r})")
    updates = client_updates(strategy, results, [module])
    errors = aggregation_errors(strategy, results, [aggregator], [module], progress=False)
    return {"delta": AggregatedDeltas(strategy, results, aggregator, [module])[module].double(),
            "reference": owner_mean(updates, module), "coverage": coverage([u.masks for u in updates], module),
            "errors": errors.iloc[0].to_dict()}


def energy_by_rank(delta: Tensor, ranks: Sequence[int]) -> np.ndarray:
    """Energy a rank-r truncated SVD keeps, ``Σ_{i<r} σ_i² / Σ σ_i²``, for each r in ``ranks``.

    Ranks above ``min(out, in)`` keep everything (1.0); a zero matrix keeps 1.0 (as ``svd_refactor``).
    """
    if any(int(r) < 1 for r in ranks):
        raise LegokitError(f"ranks must be >= 1, got {list(ranks)}")
    s2 = torch.linalg.svdvals(delta.detach().to(torch.float64)) ** 2  # (min(out, in),)
    total = float(s2.sum())
    if total == 0:
        return np.ones(len(ranks))
    cum = (torch.cumsum(s2, 0) / total).numpy()
    return np.array([1.0 if int(r) >= len(cum) else min(1.0, float(cum[int(r) - 1])) for r in ranks])


def coverage_table(masks: Sequence[Mapping[str, Tensor]], names: Sequence[str] | None = None) -> pd.DataFrame:
    """Per module: ``module, layer, kind, mean_owners`` and ``owners_<c>`` = fraction of coordinates owned
    by exactly ``c`` of the K clients (c = 0..K)."""
    if not masks:
        raise LegokitError("no client masks given: pass at least one client")
    names = list(masks[0] if names is None else names)
    K = len(masks)
    rows = []
    for name in names:
        cov = coverage(masks, name)  # (out, in) int32 in [0, K]
        frac = torch.bincount(cov.reshape(-1).long(), minlength=K + 1).double() / cov.numel()
        row = {"module": name, "layer": layer_of(name), "kind": name.rsplit(".", 1)[-1],
               "mean_owners": float(cov.double().mean())}
        row.update({f"owners_{c}": float(frac[c]) for c in range(K + 1)})
        rows.append(row)
    return pd.DataFrame(rows)


def update_norm_table(updates: Sequence[ClientUpdate], masked: bool = True) -> pd.DataFrame:
    """Long table ``client, module, layer, kind, norm`` of ‖M_k ⊙ ΔW_k‖_F (``aggregate.update_norms``)."""
    rows = [{"client": c, "module": n, "layer": layer_of(n), "kind": n.rsplit(".", 1)[-1], "norm": v}
            for c, per in update_norms(list(updates), masked=masked).items() for n, v in per.items()]
    return pd.DataFrame(rows)


@contextmanager
def apply_delta(model: nn.Module, deltas: Mapping[str, Tensor], progress: bool = False) -> Iterator[nn.Module]:
    """Within the block, ``W += ΔW`` for every module in ``deltas``; the original weights come back exactly.

    ``deltas`` may be lazy (:class:`AggregatedDeltas`): each module is computed, added and dropped in turn.
    Memory: one copy of the touched weights (restored by copy, not by subtraction, so bit-exact).
    """
    saved: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            for name in progress_bar(list(deltas), desc="apply ΔW", disable=not progress, leave=False):
                mod = model.get_submodule(name)
                if isinstance(mod, LinearView):
                    raise LegokitError(f"{name} is a view of the LLM's weight: call legokit.slm.materialize(model) "
                                       "before apply_delta")
                w = mod.weight
                d = deltas[name]
                if tuple(d.shape) != tuple(w.shape):
                    raise LegokitError(f"delta for {name} has shape {tuple(d.shape)}, the weight {tuple(w.shape)}")
                saved[name] = w.detach().clone()
                w += d.to(w.device, w.dtype)
        yield model
    finally:
        with torch.no_grad():
            for name, w0 in saved.items():
                model.get_submodule(name).weight.copy_(w0)
