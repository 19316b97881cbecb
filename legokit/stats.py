"""Paired statistics for judging a claim from per-item evaluation records.

A claim compares two models on the same test items, e.g. C1's margin = lego - fedavg_dense. The data shape is
``Cells = Mapping[(seed, task), Mapping[uid, value]]``: one value per item (1/0 accuracy, a token-F1, a per-item
NLL), keyed by the item's stable ``uid``. Items are paired by uid within a (seed, task) cell and never across seeds
(each seed may have drawn different items). The margin is

    estimate = mean over seeds ( sum over tasks w_t * mean over items (x - y) ),   w_t = 1/T unless ``weights``.

``paired_difference`` gives that estimate and a paired, hierarchical bootstrap interval; ``verdict`` reads the
interval against a threshold; ``min_detectable_effect`` and ``projected_half_width`` say what the design can
resolve and how many items or seeds a tighter interval needs. ``two_sample_interval`` bootstraps a statistic of two
independent samples (the membership-inference audit's AUC). Everything works in the caller's units (points x100
or fractions alike). numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from legokit.utils import LegokitError

Cells = Mapping[tuple[Hashable, str], Mapping[str, float]]

# Cap on the (resamples x items) index block drawn at once: bounds memory (8 bytes each, ~32 MB) for big cells.
_MAX_DRAW = 4_000_000


@dataclass(frozen=True)
class PairedResult:
    """A paired margin ``x - y`` with its bootstrap interval and the variance parts behind it.

    ``within_var`` is the item-sampling variance of ``estimate`` (sum over cells of w_t^2 var(d)/n, over S^2);
    ``unit_var`` is the same with one item per cell and one seed (what ``projected_half_width`` rescales);
    ``between_var`` is the variance of the true per-seed margins across seeds (0 with one seed or when seeds were
    not resampled). All three are analytic (moment) estimates, used only for projections.
    """

    estimate: float
    low: float
    high: float
    se: float
    level: float
    n_boot: int
    n_items: int
    n_seeds: int
    per_task: dict[str, float] = field(default_factory=dict)
    within_var: float = 0.0
    between_var: float = 0.0
    unit_var: float = 0.0
    resample_seeds: bool = True

    @property
    def half_width(self) -> float:
        """Half the interval's width, ``(high - low) / 2``."""
        return (self.high - self.low) / 2


def cells_from_records(records: Iterable[Mapping[str, Any]], value: str, *, seed_key: str = "seed",
                       task_key: str = "task", uid_key: str = "uid") -> dict[tuple[Hashable, str], dict[str, float]]:
    """Group per-item record dicts into ``{(seed, task): {uid: value}}``.

    Args:
        records: dicts with keys ``seed_key``, ``task_key``, ``uid_key`` and ``value``.
        value: the name of the value column (e.g. ``"acc"``, ``"f1"``, ``"nll"``).
    Returns:
        the cells, ready for ``paired_difference``. A repeated (seed, task, uid) is an error, not an overwrite.
    """
    cells: dict[tuple[Hashable, str], dict[str, float]] = {}
    for i, rec in enumerate(records):
        missing = [k for k in (seed_key, task_key, uid_key, value) if k not in rec]
        if missing:
            raise LegokitError(f"record {i} lacks {', '.join(map(repr, missing))} (has {sorted(rec)}): "
                               f"pass value=/seed_key=/task_key=/uid_key= naming the record's columns")
        cell = cells.setdefault((rec[seed_key], str(rec[task_key])), {})
        uid = str(rec[uid_key])
        if uid in cell:
            raise LegokitError(f"uid {uid!r} appears twice in seed={rec[seed_key]!r} task={rec[task_key]!r} "
                               f"(record {i}): keep one record per item, e.g. drop duplicates before grouping")
        cell[uid] = float(rec[value])
    return cells


def _sort_key(v: Hashable) -> tuple[str, str]:
    # Seeds may be ints or strings; sorting by (type, repr) gives one order whatever the mappings' insertion order,
    # so the same data always meets the same random draws.
    return (type(v).__name__, repr(v))


def _check_args(level: float, n_boot: int) -> None:
    if not 0 < level < 1:
        raise LegokitError(f"level={level} must lie in (0, 1): use e.g. level=0.95 for a 95% interval")
    if n_boot < 100:
        raise LegokitError(f"n_boot={n_boot} is too few resamples for an interval's ends: use n_boot >= 100 "
                           f"(2000 is the default)")


def _paired_cells(x: Cells, y: Cells) -> dict[Hashable, dict[str, np.ndarray]]:
    """Validate x and y and return ``{seed: {task: d}}`` with ``d = x - y`` aligned by sorted uid."""
    if not x or not y:
        raise LegokitError(f"no cells to compare (x has {len(x)}, y has {len(y)}): pass both models' per-item "
                           f"values as {{(seed, task): {{uid: value}}}}")
    only_x = sorted(set(x) - set(y), key=_sort_key)
    only_y = sorted(set(y) - set(x), key=_sort_key)
    if only_x or only_y:
        raise LegokitError(f"x and y cover different (seed, task) cells: only in x {only_x[:5]}, only in y "
                           f"{only_y[:5]}: evaluate both models on the same seeds and tasks, or drop those cells")
    seeds = sorted({s for s, _ in x}, key=_sort_key)
    tasks_of = {s: sorted(t for s2, t in x if s2 == s) for s in seeds}
    ref = tasks_of[seeds[0]]
    for s in seeds[1:]:
        if tasks_of[s] != ref:
            raise LegokitError(f"seed {s!r} has tasks {tasks_of[s]} but seed {seeds[0]!r} has {ref}: the margin "
                               f"averages tasks within each seed, so give every seed the same tasks")
    out: dict[Hashable, dict[str, np.ndarray]] = {}
    for s in seeds:
        out[s] = {}
        for t in ref:
            xs, ys = x[(s, t)], y[(s, t)]
            if not xs or not ys:
                raise LegokitError(f"cell seed={s!r} task={t!r} is empty (x has {len(xs)} items, y has {len(ys)}): "
                                   f"drop the cell or evaluate its items")
            ux, uy = set(xs), set(ys)
            if ux != uy:
                ox, oy = sorted(ux - uy), sorted(uy - ux)
                raise LegokitError(f"cell seed={s!r} task={t!r}: uid sets differ, {len(ox)} only in x (e.g. {ox[:3]}), "
                                   f"{len(oy)} only in y (e.g. {oy[:3]}): score both models on the same items, "
                                   f"or keep only the shared uids in both")
            uids = sorted(ux)
            xv = np.array([xs[u] for u in uids], dtype=np.float64)
            yv = np.array([ys[u] for u in uids], dtype=np.float64)
            for name, v in (("x", xv), ("y", yv)):
                bad = np.flatnonzero(~np.isfinite(v))
                if bad.size:
                    raise LegokitError(f"{name} has a non-finite value {v[bad[0]]} at seed={s!r} task={t!r} "
                                       f"uid={uids[bad[0]]!r} ({bad.size} in that cell): re-score the item or drop "
                                       f"its uid from both x and y")
            out[s][t] = xv - yv
    return out


def _task_weights(tasks: list[str], weights: Mapping[str, float] | None) -> np.ndarray:
    if weights is None:
        return np.full(len(tasks), 1.0 / len(tasks))
    if set(weights) != set(tasks):
        raise LegokitError(f"weights name tasks {sorted(weights)} but the cells have tasks {tasks}: give one weight "
                           f"per task, or weights=None for equal weights")
    w = np.array([float(weights[t]) for t in tasks])
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise LegokitError(f"weights {dict(weights)} must be finite, >= 0 and not all 0: they are normalised to sum 1")
    return w / w.sum()


def _resampled_means(d: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``k`` with-replacement resamples of ``d`` (each of size len(d)); shape (k,)."""
    n = d.size
    out = np.empty(k)
    chunk = max(1, _MAX_DRAW // n)
    for start in range(0, k, chunk):
        stop = min(k, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))  # (chunk, n)
        out[start:stop] = d[idx].mean(axis=1)
    return out


def paired_difference(x: Cells, y: Cells, *, weights: Mapping[str, float] | None = None, n_boot: int = 2000,
                      level: float = 0.95, seed: int = 0, resample_seeds: bool = True) -> PairedResult:
    """Margin ``x - y`` (mean over seeds of the weighted mean over tasks of per-task mean paired differences).

    The interval is a paired percentile bootstrap: each resample draws the seeds with replacement (when there are
    >= 2 and ``resample_seeds``), then, independently for every drawn seed, the items of each (seed, task) cell with
    replacement, the same uids for x and y. With few seeds (2-3) this two-stage scheme is approximate: the seed draw
    shrinks the between-seed spread by (S-1)/S and the item draw counts the item noise a second time, so the interval
    is somewhat conservative when seeds agree and somewhat narrow when they differ a lot.

    Args:
        x, y: ``{(seed, task): {uid: value}}`` of the two models; same cells and, per cell, the same uids.
        weights: per-task weights (normalised to sum 1); ``None`` = equal.
        n_boot: number of bootstrap resamples (>= 100).
        level: the interval's coverage in (0, 1).
        seed: the RNG seed; the same call gives the same interval.
        resample_seeds: ``False`` treats the seeds as fixed (only items are resampled).
    Returns:
        a ``PairedResult``.
    """
    _check_args(level, n_boot)
    diffs = _paired_cells(x, y)
    seeds = list(diffs)
    tasks = list(diffs[seeds[0]])
    w = _task_weights(tasks, weights)
    S = len(seeds)

    means = np.array([[diffs[s][t].mean() for t in tasks] for s in seeds])  # (S, T)
    per_seed = means @ w  # (S,)
    estimate = float(per_seed.mean())
    per_task = {t: float(means[:, j].mean()) for j, t in enumerate(tasks)}

    # Analytic variance parts, only for projections: item variance of each seed's margin, and the spread of the
    # seeds' margins beyond what item noise explains (method of moments, clipped at 0).
    var_d = np.array([[diffs[s][t].var(ddof=1) if diffs[s][t].size > 1 else 0.0 for t in tasks] for s in seeds])
    n = np.array([[diffs[s][t].size for t in tasks] for s in seeds])
    seed_item_var = (var_d / n) @ (w**2)  # (S,) variance of each seed's margin from its items
    within_var = float(seed_item_var.sum() / S**2)
    unit_var = float((var_d @ (w**2)).mean())
    hier = resample_seeds and S >= 2
    between_var = max(0.0, float(per_seed.var(ddof=1) - seed_item_var.mean())) if hier else 0.0

    rng = np.random.default_rng(seed)
    # slot[b, j] = which seed fills position j of resample b; every (b, j) gets its own item resample below.
    slot = rng.integers(0, S, size=(n_boot, S)) if hier else np.tile(np.arange(S), (n_boot, 1))  # (B, S)
    slot_vals = np.zeros((n_boot, S))
    for i, s in enumerate(seeds):
        hit = slot == i
        k = int(hit.sum())
        if k == 0:
            continue
        vals = np.zeros(k)
        for j, t in enumerate(tasks):
            vals += w[j] * _resampled_means(diffs[s][t], k, rng)
        slot_vals[hit] = vals
    boot = slot_vals.mean(axis=1)  # (B,)
    alpha = 1 - level
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return PairedResult(estimate=estimate, low=float(low), high=float(high), se=float(boot.std(ddof=1)),
                        level=level, n_boot=n_boot, n_items=int(n.sum()), n_seeds=S, per_task=per_task,
                        within_var=within_var, between_var=between_var, unit_var=unit_var,
                        resample_seeds=resample_seeds)


def two_sample_interval(x, y, statistic, *, n_boot: int = 2000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(x, y)`` over two independent samples (not paired: e.g. the
    members' and the non-members' scores of a membership-inference attack, whose AUC is the statistic).

    Each resample draws ``x`` and ``y`` with replacement, each at its own size, and recomputes the statistic.

    Args:
        x, y: 1-D samples (non-empty, finite).
        statistic: ``f(x, y) -> float``.
        n_boot, level, seed: as ``paired_difference``.
    Returns:
        ``(low, high)``.
    """
    _check_args(level, n_boot)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    for name, v in (("x", x), ("y", y)):
        if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)):
            raise LegokitError(f"{name} must be a non-empty 1-D array of finite values (got shape {v.shape}): drop "
                               "the non-finite values or give both samples")
    rng = np.random.default_rng(seed)
    boot = np.array([statistic(x[rng.integers(0, x.size, x.size)], y[rng.integers(0, y.size, y.size)])
                     for _ in range(n_boot)])
    alpha = 1 - level
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def verdict(interval: PairedResult | tuple[float, float], threshold: float, better: str = "above") -> str:
    """Three-way reading of an interval against a threshold: ``"held"``, ``"not held"`` or ``"inconclusive"``.

    With ``better="above"``: held when ``low >= threshold``, not held when ``high < threshold``, else inconclusive.
    With ``better="below"``: held when ``high <= threshold``, not held when ``low > threshold``. An end equal to the
    threshold counts on the held side (the threshold itself is a good value).

    Args:
        interval: a ``PairedResult`` or a ``(low, high)`` pair.
        threshold: the claim's bound, in the interval's units.
        better: ``"above"`` or ``"below"``: the side of the threshold where the claim holds.
    """
    low, high = (interval.low, interval.high) if isinstance(interval, PairedResult) else map(float, interval)
    if not low <= high:
        raise LegokitError(f"interval ({low}, {high}) has low > high (or NaN): pass (low, high) in that order")
    if better == "above":
        return "held" if low >= threshold else "not held" if high < threshold else "inconclusive"
    if better == "below":
        return "held" if high <= threshold else "not held" if low > threshold else "inconclusive"
    raise LegokitError(f"better={better!r}: use 'above' or 'below' (the side of the threshold where the claim holds)")


def min_detectable_effect(result: PairedResult, power: float = 0.8) -> float:
    """Smallest true margin a two-sided test at ``result.level`` detects with probability ``power``.

    Normal approximation: ``(z_{1-alpha/2} + z_{power}) * se`` with ``alpha = 1 - level``; e.g. 2.80 se at 95%/80%.
    """
    if not 0 < power < 1:
        raise LegokitError(f"power={power} must lie in (0, 1): use e.g. power=0.8")
    z = NormalDist().inv_cdf
    return (z(1 - (1 - result.level) / 2) + z(power)) * result.se


def projected_half_width(result: PairedResult, items_per_task: int | None = None, seeds: int | None = None) -> float:
    """Half-width expected with ``items_per_task`` items in every (seed, task) cell and/or ``seeds`` seeds.

    The item part of the variance scales as 1/(items x seeds), the between-seed part as 1/seeds; the observed
    half-width is rescaled by sqrt(projected variance / current variance), so ``projected_half_width(result)``
    is ``result.half_width`` and quadrupling the items of a one-seed design halves it. With one seed (or
    ``resample_seeds=False``) the between-seed variance is unknown and taken as 0: adding seeds then only averages
    item noise, which is optimistic if seeds really differ. ``None`` keeps the current value.
    """
    for name, v in (("items_per_task", items_per_task), ("seeds", seeds)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise LegokitError(f"{name}={v!r} must be a positive integer (or None to keep the current design)")
    S = result.n_seeds
    S2 = seeds or S
    current = result.within_var + result.between_var / S
    if current <= 0:
        return 0.0  # every paired difference equal: no sampling spread at any size
    item_part = result.unit_var / (items_per_task * S2) if items_per_task else result.within_var * S / S2
    projected = item_part + result.between_var / S2
    return result.half_width * math.sqrt(projected / current)
