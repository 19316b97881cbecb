"""What HeteAgg exposes for a block mix: how many clients own each weight, and which weights only one client owns.

HeteAgg's value at a weight is the mean of its owners' updates. Where one client owns a weight, that mean is its
own update, sent back to every block that holds the weight; secure aggregation hides a sum, not a sum of one.
The owners are read off the clients' keep-masks, which the server knows (it made the blocks): no update is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from legokit.aggregate import coverage
from legokit.utils import LegokitError


def owner_count(masks: Sequence[Mapping[str, Tensor]], name: str) -> Tensor:
    """How many of ``masks`` own each weight of module ``name``: int32 (out, in).

    Clients holding the same block pass the same masks object; each distinct one is counted once and weighted
    by how many clients hold it (64 clients on 4 blocks cost 4 additions).
    """
    if not masks:
        raise LegokitError("no client masks given: pass at least one client")
    distinct: dict[int, tuple[Mapping[str, Tensor], int]] = {}
    for m in masks:
        held = distinct.get(id(m))
        distinct[id(m)] = (m, 1 if held is None else held[1] + 1)
    count = None
    for m, times in distinct.values():
        c = coverage([m], name) * times  # (out, in) int32
        count = c if count is None else count + c
    return count


def _histogram(count: Tensor, clients: int) -> Tensor:
    return torch.bincount(count.reshape(-1).long(), minlength=clients + 1).double()  # (clients + 1,)


def owner_shares(count: Tensor, clients: int) -> list[float]:
    """Share of the weights owned by exactly 0, 1, ..., ``clients`` clients (sums to 1)."""
    return (_histogram(count, clients) / max(count.numel(), 1)).tolist()


def exposure(masks: Sequence[Mapping[str, Tensor]], clients: Sequence[str],
             names: Sequence[str] | None = None) -> dict:
    """The exposure of a block mix under HeteAgg.

    Args:
        masks: one keep-mask mapping ``{module: bool (out, in)}`` per client (a block's ``masks``).
        clients: their labels, in the same order.
        names: the modules to read (default: the first client's).
    Returns:
        ``{"clients": [...], "weights": N, "owners": [share owned by 0..K clients], "sole": {client: share of all
        weights only it owns}, "modules": {module: {"weights": n, "owners": [...], "sole": {...}}}}``; the
        top-level shares are over all modules' weights together. A client's ``sole`` share is the part of the
        model where its own update is what every block holding that weight receives.
    """
    if len(masks) != len(clients):
        raise LegokitError(f"{len(masks)} mask mappings for {len(clients)} client labels: give one label per client")
    if len(set(clients)) != len(clients):
        raise LegokitError(f"client labels repeat: {list(clients)}")
    names = list(masks[0] if names is None else names) if masks else []
    K = len(clients)
    modules, total_hist, total_sole, total = {}, torch.zeros(K + 1, dtype=torch.float64), [0] * K, 0
    for name in names:
        count = owner_count(masks, name)  # (out, in) int32 in [0, K]
        single = count == 1
        sole = [int((single & m[name].to(single.device)).sum()) for m in masks]
        n = count.numel()
        modules[name] = {"weights": n, "owners": owner_shares(count, K),
                         "sole": {c: s / n for c, s in zip(clients, sole, strict=True)}}
        total_hist += _histogram(count, K)
        total_sole = [a + b for a, b in zip(total_sole, sole, strict=True)]
        total += n
    return {"clients": list(clients), "weights": total, "owners": (total_hist / max(total, 1)).tolist(),
            "sole": {c: s / max(total, 1) for c, s in zip(clients, total_sole, strict=True)}, "modules": modules}
