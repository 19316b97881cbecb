"""Tests for legokit.stats: paired bootstrap margins checked against textbook formulas on synthetic data."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from legokit.stats import (
    PairedResult,
    cells_from_records,
    min_detectable_effect,
    paired_difference,
    projected_half_width,
    verdict,
)
from legokit.utils import LegokitError

Z975 = NormalDist().inv_cdf(0.975)


def make_pair(n: int, mu: float, sigma: float, rho: float = 0.95, seed: int = 0, task: str = "piqa",
              run: int = 0, offset: float = 0.0) -> tuple[dict, dict]:
    """One (seed, task) cell of correlated x, y with x - y ~ N(mu + offset, sigma) per item."""
    rng = np.random.default_rng(seed)
    # y has a large shared item difficulty; x = y + d so that var(x), var(y) >> var(x - y) (rho close to 1).
    scale = sigma / math.sqrt(2 * (1 - rho))
    y = rng.normal(0.0, scale, n)
    d = rng.normal(mu + offset, sigma, n)
    uids = [f"{task}-{i:05d}" for i in range(n)]
    x = y + d
    return ({(run, task): dict(zip(uids, x.tolist(), strict=True))},
            {(run, task): dict(zip(uids, y.tolist(), strict=True))})


def merge(*pairs: tuple[dict, dict]) -> tuple[dict, dict]:
    x, y = {}, {}
    for px, py in pairs:
        x.update(px)
        y.update(py)
    return x, y


# --------------------------------------------------------------------------------------------- estimate & interval


def test_one_cell_matches_textbook_normal_interval():
    # prepare: 500 items, x and y correlated (rho = 0.95 between each model's values and the difference small)
    n, mu, sigma = 500, 2.0, 3.0
    x, y = make_pair(n, mu, sigma, seed=1)
    d = np.array([x[(0, "piqa")][u] - y[(0, "piqa")][u] for u in x[(0, "piqa")]])
    ref_half = Z975 * d.std(ddof=1) / math.sqrt(n)
    # execute
    r = paired_difference(x, y, n_boot=4000, seed=7)
    # assert: estimate exact; ends and se within 10% of the textbook half-width (~0.26 here). This discriminates:
    # an unpaired bootstrap sees var(x) + var(y) ~ 21 sigma^2 instead of var(x - y) = sigma^2 (make_pair gives y a
    # shared item difficulty of variance sigma^2 / (2 (1 - rho)) = 10 sigma^2), an interval ~4.6x wider; forgetting
    # the 1/sqrt(n) makes it sqrt(500) ~ 22x wider; a 90% interval is 16% narrower.
    assert r.estimate == pytest.approx(d.mean(), abs=1e-12)
    assert r.low == pytest.approx(d.mean() - ref_half, abs=0.1 * ref_half)
    assert r.high == pytest.approx(d.mean() + ref_half, abs=0.1 * ref_half)
    assert r.half_width == pytest.approx(ref_half, rel=0.1)
    assert r.se == pytest.approx(d.std(ddof=1) / math.sqrt(n), rel=0.1)
    assert (r.level, r.n_boot, r.n_items, r.n_seeds) == (0.95, 4000, n, 1)
    assert r.per_task == {"piqa": pytest.approx(d.mean())}


def test_coverage_and_unbiasedness_over_replications():
    # prepare: 200 independent experiments with a known true margin, two tasks of unequal size
    true_mu, reps = 1.5, 200
    estimates, covered = [], 0
    # execute
    for k in range(reps):
        x, y = merge(make_pair(60, true_mu - 1.0, 2.0, seed=2 * k, task="a"),
                     make_pair(40, true_mu + 1.0, 2.0, seed=2 * k + 1, task="b"))
        r = paired_difference(x, y, n_boot=300, seed=k)
        estimates.append(r.estimate)
        covered += r.low <= true_mu <= r.high
    # assert: coverage near 95% (binomial sd ~1.5% over 200); estimate mean within 4 sd of the truth.
    # True se of the estimate: 0.5 * sqrt(4/60 + 4/40) ~ 0.20, so 4 sd of a 200-mean is ~0.06.
    assert 0.90 <= covered / reps <= 0.99
    sd_of_mean = 0.5 * math.sqrt(4 / 60 + 4 / 40) / math.sqrt(reps)
    assert abs(np.mean(estimates) - true_mu) < 4 * sd_of_mean


def test_equal_task_weights_not_pooled_over_items():
    # prepare: task a has 10 items, task b 200, with very different mean differences
    x, y = merge(make_pair(10, 5.0, 1.0, seed=3, task="a"), make_pair(200, -1.0, 1.0, seed=4, task="b"))
    mean_a = np.mean([x[(0, "a")][u] - y[(0, "a")][u] for u in x[(0, "a")]])
    mean_b = np.mean([x[(0, "b")][u] - y[(0, "b")][u] for u in x[(0, "b")]])
    pooled = (10 * mean_a + 200 * mean_b) / 210
    # execute
    r = paired_difference(x, y, n_boot=200)
    rw = paired_difference(x, y, n_boot=200, weights={"a": 3.0, "b": 1.0})
    # assert: the mean of per-task means, far from the pooled mean; explicit weights respected
    assert r.estimate == pytest.approx((mean_a + mean_b) / 2, abs=1e-12)
    assert abs(pooled - r.estimate) > 2.0
    assert rw.estimate == pytest.approx(0.75 * mean_a + 0.25 * mean_b, abs=1e-12)
    assert r.per_task == {"a": pytest.approx(mean_a), "b": pytest.approx(mean_b)}


def test_seeds_averaged_and_resampled():
    # prepare: 3 seeds with different items (distinct uids per seed) and seed margins 0, +5, -5 around mu=1
    x, y = merge(*(make_pair(300, 1.0, 1.0, seed=10 + 2 * s + (t == "b"), run=s, task=t, offset=off)
                   for s, off in enumerate((0.0, 5.0, -5.0)) for t in ("a", "b")))
    for s in range(3):  # uids differ across seeds: pairing is within a seed only
        for t in ("a", "b"):
            x[(s, t)] = {f"s{s}-{u}": v for u, v in x[(s, t)].items()}
            y[(s, t)] = {f"s{s}-{u}": v for u, v in y[(s, t)].items()}
    seed_means = [np.mean([np.mean([x[(s, t)][u] - y[(s, t)][u] for u in x[(s, t)]]) for t in "ab"])
                  for s in range(3)]
    # execute
    hier = paired_difference(x, y, n_boot=1000, seed=0)
    flat = paired_difference(x, y, n_boot=1000, seed=0, resample_seeds=False)
    # assert: same estimate (mean over seeds); seeds differing by +-5 dominate the hierarchical interval, while
    # the item-only interval reflects only the within-cell noise (se ~ 1/sqrt(1800) ~ 0.024)
    assert hier.estimate == pytest.approx(np.mean(seed_means), abs=1e-12)
    assert flat.estimate == hier.estimate
    assert hier.n_seeds == 3 and hier.n_items == 1800
    assert hier.half_width > 20 * flat.half_width
    assert flat.half_width == pytest.approx(Z975 * math.sqrt(0.25 * 2 / 300 / 3), rel=0.15)
    assert hier.between_var > 10 and flat.between_var == 0.0


def test_pairing_is_by_uid_not_by_order():
    # prepare: the items of y, then of x, inserted in reverse order
    x, y = make_pair(200, 1.0, 1.0, seed=5)
    x_rev = {k: dict(reversed(list(v.items()))) for k, v in x.items()}
    y_rev = {k: dict(reversed(list(v.items()))) for k, v in y.items()}
    # execute
    r = paired_difference(x, y, n_boot=500)
    r_y, r_x = paired_difference(x, y_rev, n_boot=500), paired_difference(x_rev, y, n_boot=500)
    # assert: identical estimate and interval whatever the insertion order (the same data meets the same draws);
    # a positional pairing would give a wide interval around ~1
    assert (r.estimate, r.low, r.high) == (r_y.estimate, r_y.low, r_y.high) == (r_x.estimate, r_x.low, r_x.high)
    assert r.half_width < 0.2


def test_same_seed_same_interval_and_other_seed_differs():
    x, y = make_pair(100, 1.0, 1.0, seed=6)
    a, b = paired_difference(x, y, n_boot=500, seed=3), paired_difference(x, y, n_boot=500, seed=3)
    c = paired_difference(x, y, n_boot=500, seed=4)
    assert (a.low, a.high, a.se) == (b.low, b.high, b.se)
    assert (a.low, a.high) != (c.low, c.high)


def test_six_tasks_three_seeds_500_items_count_every_pair():
    x, y = merge(*(make_pair(500, 1.0, 1.0, seed=20 + 6 * s + j, run=s, task=f"t{j}")
                   for s in range(3) for j in range(6)))
    r = paired_difference(x, y)  # n_boot=2000 (its speed is not a test's business)
    assert r.n_items == 9000 and r.n_boot == 2000 and r.n_seeds == 3 and len(r.per_task) == 6


def test_cells_from_records_groups_and_matches_mapping():
    records = [{"seed": s, "task": "boolq", "uid": f"boolq-{i}", "acc": float((i + s) % 2)}
               for s in range(2) for i in range(4)]
    cells = cells_from_records(records, "acc")
    assert cells == {(0, "boolq"): {"boolq-0": 0.0, "boolq-1": 1.0, "boolq-2": 0.0, "boolq-3": 1.0},
                     (1, "boolq"): {"boolq-0": 1.0, "boolq-1": 0.0, "boolq-2": 1.0, "boolq-3": 0.0}}
    with pytest.raises(LegokitError, match="appears twice"):
        cells_from_records(records + records[:1], "acc")
    with pytest.raises(LegokitError, match="lacks 'f1'"):
        cells_from_records(records, "f1")


# --------------------------------------------------------------------------------------------- verdict & design


def test_verdict_three_outcomes_and_boundaries():
    assert verdict((0.5, 2.0), 0.0) == "held"
    assert verdict((-2.0, -0.5), 0.0) == "not held"
    assert verdict((-0.5, 0.5), 0.0) == "inconclusive"
    assert verdict((0.0, 1.0), 0.0) == "held"  # an end on the threshold counts on the held side
    assert verdict((-1.0, 0.0), 0.0) == "inconclusive"
    # C1-style "within 2 points": the margin's interval must sit above -2
    assert verdict((-1.5, 0.3), -2.0) == "held"
    assert verdict((-3.0, -1.0), -2.0) == "inconclusive"
    # perplexity-style: lower is better
    assert verdict((1.0, 4.0), 5.0, better="below") == "held"
    assert verdict((6.0, 7.0), 5.0, better="below") == "not held"
    assert verdict((4.0, 6.0), 5.0, better="below") == "inconclusive"
    r = PairedResult(estimate=1.0, low=0.2, high=1.8, se=0.4, level=0.95, n_boot=2000, n_items=10, n_seeds=1)
    assert verdict(r, 0.0) == "held" and r.half_width == pytest.approx(0.8)
    with pytest.raises(LegokitError, match="'above' or 'below'"):
        verdict((0.0, 1.0), 0.0, better="higher")


def test_min_detectable_effect_hand_formula():
    r = PairedResult(estimate=0.0, low=-1.0, high=1.0, se=0.5, level=0.95, n_boot=2000, n_items=100, n_seeds=1)
    # z_{0.975} = 1.95996, z_{0.8} = 0.84162
    assert min_detectable_effect(r) == pytest.approx((1.959964 + 0.841621) * 0.5, rel=1e-5)
    r90 = PairedResult(estimate=0.0, low=-1.0, high=1.0, se=0.5, level=0.90, n_boot=2000, n_items=100, n_seeds=1)
    assert min_detectable_effect(r90, power=0.9) == pytest.approx((1.644854 + 1.281552) * 0.5, rel=1e-5)
    with pytest.raises(LegokitError, match="power"):
        min_detectable_effect(r, power=1.0)


def test_projected_half_width_scales_with_items_and_seeds():
    x, y = merge(make_pair(100, 1.0, 2.0, seed=8, task="a"), make_pair(100, 1.0, 1.0, seed=9, task="b"))
    r = paired_difference(x, y, n_boot=500)
    assert projected_half_width(r) == pytest.approx(r.half_width)
    assert projected_half_width(r, items_per_task=100) == pytest.approx(r.half_width, rel=0.02)
    assert projected_half_width(r, items_per_task=400) == pytest.approx(r.half_width / 2, rel=0.02)
    # one seed: between-seed variance taken as 0, so 4 seeds act like 4x the items
    assert projected_half_width(r, seeds=4) == pytest.approx(r.half_width / 2)
    # several seeds that disagree: more items cannot shrink the between-seed part
    xs, ys = merge(*(make_pair(100, 1.0, 1.0, seed=30 + s, run=s, offset=3.0 * s) for s in range(3)))
    rs = paired_difference(xs, ys, n_boot=500)
    assert projected_half_width(rs, items_per_task=10_000) > 0.9 * rs.half_width
    assert projected_half_width(rs, seeds=12) == pytest.approx(rs.half_width / 2, rel=0.02)
    with pytest.raises(LegokitError, match="positive integer"):
        projected_half_width(r, items_per_task=0)


# --------------------------------------------------------------------------------------------- bad input


def _good() -> tuple[dict, dict]:
    return merge(make_pair(20, 1.0, 1.0, seed=11, task="a"), make_pair(20, 1.0, 1.0, seed=12, task="b"))


def _drop_cell(c: dict) -> dict:
    return {k: v for k, v in c.items() if k != (0, "b")}


def _with(c: dict, cell: tuple, items: dict) -> dict:
    return {**c, cell: items}


@pytest.mark.parametrize("mutate, words", [
    (lambda x, y: (_drop_cell(x), y), ["different (seed, task) cells", "only in y [(0, 'b')]"]),
    (lambda x, y: (x, _with(y, (1, "a"), {"u": 0.0})), ["different (seed, task) cells", "only in y [(1, 'a')]"]),
    (lambda x, y: ({k: {u: v for u, v in list(c.items())[3:]} for k, c in x.items()}, y),
     ["seed=0 task='a'", "uid sets differ", "0 only in x", "3 only in y", "a-00000"]),
    (lambda x, y: (_with(x, (0, "a"), {**x[(0, "a")], "a-00007": float("nan")}), y),
     ["non-finite", "seed=0 task='a' uid='a-00007'"]),
    (lambda x, y: (x, _with(y, (0, "b"), {**y[(0, "b")], "b-00002": float("inf")})),
     ["y has a non-finite value inf", "uid='b-00002'"]),
    (lambda x, y: (_with(x, (0, "a"), {}), _with(y, (0, "a"), {})), ["seed=0 task='a' is empty"]),
    (lambda x, y: ({}, y), ["no cells"]),
])
def test_bad_cells_raise_naming_the_problem(mutate, words):
    x, y = mutate(*_good())
    with pytest.raises(LegokitError) as err:
        paired_difference(x, y, n_boot=100)
    for w in words:
        assert w in str(err.value)


def test_bad_arguments_raise():
    x, y = _good()
    with pytest.raises(LegokitError, match=r"level=1.5 must lie in \(0, 1\)"):
        paired_difference(x, y, level=1.5)
    with pytest.raises(LegokitError, match=r"level=0 must lie in \(0, 1\)"):
        paired_difference(x, y, level=0)
    with pytest.raises(LegokitError, match="n_boot=50.*n_boot >= 100"):
        paired_difference(x, y, n_boot=50)
    with pytest.raises(LegokitError, match="one weight per task"):
        paired_difference(x, y, weights={"a": 1.0})
    x2, y2 = merge((x, y), make_pair(20, 1.0, 1.0, seed=13, run=1, task="a"))
    with pytest.raises(LegokitError, match="same tasks"):
        paired_difference(x2, y2)
