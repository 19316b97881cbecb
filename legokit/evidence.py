"""The evidence of the claims: every margin a claim uses as a paired difference over test items, with an interval.

A verdict on seed means says nothing about noise. With per-item records (``evaluate.score_model`` writes them)
every margin a claim uses is a paired difference over the same test items (and seeds), with a 95% bootstrap
interval (``legokit.stats``), read three ways: held, not held, or inconclusive when the interval straddles the
threshold. Each claim is judged on the primary metric (points) and on gold-response NLL (nats per token).
``legokit.claims`` hands on ``evidence``, ``evidence_table`` and ``claim_verdicts`` (the experiment notebook calls
them as ``claims.*``).

Input everywhere: ``runs = {condition: results}`` (``Runs``, as ``claims`` takes them): one results dict per
condition, or a list of them, one per seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist

import pandas as pd

from legokit import stats
from legokit.evaluate import HELDOUT, read_items
from legokit.names import THRESHOLDS
from legokit.utils import LegokitError

Runs = Mapping[str, "dict | Sequence[dict]"]


def seed_results(runs: Runs) -> list[tuple[str, dict]]:
    """Every ``(condition, results of one seed)`` of ``runs``, conditions in their order, seeds in theirs."""
    out = []
    for cond, res in runs.items():
        for r in ([res] if isinstance(res, Mapping) else list(res)):
            out.append((cond, r))
    return out


def run_items(run_dir: str | Path, name: str) -> list[dict]:
    """The per-item records a run directory keeps as ``items/<name>`` (``evaluate.read_items``)."""
    return read_items(Path(run_dir) / "items" / name)


def _model_items(r: dict, model: str | int) -> tuple[str, list[dict]] | None:
    """``(label, records)`` of one model of one result: ``"global"``, or the block at sparsity ``model`` (%)."""
    if "run_dir" not in r:
        return None
    if model == "global":
        g = r.get("global")
        if not g or "items" not in g:
            return None
        return "global", run_items(r["run_dir"], g["items"])
    for c in r.get("clients", []):
        if round(100 * float(c["sparsity"])) == model and "items" in c.get("scores", {}):
            return f"block@{model}%", run_items(r["run_dir"], c["scores"]["items"])
    return None


def item_cells(runs: Runs, condition: str, model: str | int = "global", value: str = "correct",
               tasks: Sequence[str] | None = None) -> tuple[dict, str]:
    """``({(seed, task): {uid: value}}, scoring)`` of one condition's model over all its seeds.

    ``model``: ``"global"`` or a block's sparsity in percent. ``value``: ``"correct"`` (the item's primary metric,
    in points) or ``"nll"``. ``tasks``: restrict to these tasks. Raises when a seed lacks per-item records.
    """
    cells: dict = {}
    scorings = set()
    for cond, r in seed_results(runs):
        if cond != condition:
            continue
        got = _model_items(r, model)
        if got is None:
            raise LegokitError(f"condition {condition!r} (seed {r.get('seed', 0)}) has no per-item records for "
                               f"model {model!r}: score it (eval.blocks for blocks) with this version of legokit")
        for rec in got[1]:
            if (tasks is not None and rec["task"] not in tasks) or (tasks is None and rec["task"] == HELDOUT):
                continue  # held-out text windows join only when asked for by name
            if rec["task"] != HELDOUT:
                scorings.add(rec.get("scoring"))
            v = float(rec[value]) * (100.0 if value == "correct" else 1.0)
            cells.setdefault((r.get("seed", 0), rec["task"]), {})[rec["uid"]] = v
    if not cells:
        raise LegokitError(f"condition {condition!r} has no items for model {model!r} and tasks {tasks}")
    if len(scorings) > 1:
        raise LegokitError(f"condition {condition!r} mixes scorings {sorted(map(str, scorings))}: compare runs "
                           "evaluated the same way (eval.scoring)")
    return cells, next(iter(scorings), None)


def _paired(runs: Runs, a: str, b: str, model, value: str, tasks=None, n_boot: int = 2000):
    x, sx = item_cells(runs, a, model, value, tasks)
    y, sy = item_cells(runs, b, model, value, tasks)
    if sx != sy:
        raise LegokitError(f"{a} was scored with {sx!r} and {b} with {sy!r}: a margin needs one scoring; "
                           "rerun one of them with the other's eval.scoring")
    return stats.paired_difference(x, y, n_boot=n_boot), sx


def _row(claim: str, test: str, metric: str, res, threshold: float, better: str, scoring, **extra) -> dict:
    return {"claim": claim, "test": test, "metric": metric, "estimate": res.estimate, "low": res.low,
            "high": res.high, "threshold": threshold, "better": better,
            "verdict": stats.verdict(res, threshold, better), "mde": stats.min_detectable_effect(res),
            "items": res.n_items, "seeds": res.n_seeds, "scoring": scoring, **extra}


def _client_levels(runs: Runs, condition: str) -> dict[int, list[str]]:
    """``{sparsity %: tasks its client trained on}`` for a condition (from its first seed)."""
    for cond, r in seed_results(runs):
        if cond == condition:
            return {round(100 * float(c["sparsity"])): list(c["tasks"]) for c in r.get("clients", [])}
    return {}


def evidence(runs: Runs, thresholds: Mapping[str, float] = THRESHOLDS, n_boot: int = 2000) -> pd.DataFrame:
    """Every margin the claims use, as a paired difference over test items (and seeds) with a 95% interval.

    One row per test: ``claim, test, metric`` (``points`` or ``nll``), ``estimate, low, high`` (the margin and its
    interval), ``threshold, better`` (the side where the claim holds), ``verdict`` (held / not held /
    inconclusive), ``mde`` (the smallest true margin this design detects at 80% power), ``items, seeds, scoring``.
    Tests whose conditions or per-item records are missing are left out.

    - C1 ``lego - fedavg_dense`` >= -c1_points (points) and <= +c1_nll (NLL); ``lego - fedavg`` > 0 (points) and
      < 0 (NLL). Global LLMs, every evaluated task, equal task weights.
    - C2 per sparsity level: the ``lego`` block minus the ``local`` block on the tasks its client never trained
      on, > 0 (points) and < 0 (NLL).
    - C3 ``lego - base`` mean held-out window NLL <= log(1 + c3_ppl_relative) (a perplexity ratio within +5%);
      the tasks no client trained on are reported (``lego - base``, points) without a threshold.
    """
    rows: list[dict] = []
    have = set(runs)

    def attempt(fn):
        try:
            rows.extend(fn())
        except LegokitError as err:
            if "no per-item records" not in str(err) and "missing" not in str(err):
                raise

    if {"lego", "fedavg_dense", "fedavg"} <= have:
        def c1():
            out = []
            for other, thr_pts, thr_nll, name in (("fedavg_dense", -thresholds["c1_points"], thresholds["c1_nll"],
                                                   "lego - fedavg_dense"), ("fedavg", 0.0, 0.0, "lego - fedavg")):
                res, sc = _paired(runs, "lego", other, "global", "correct", n_boot=n_boot)
                out.append(_row("C1", name, "points", res, thr_pts, "above", sc))
                res, sc = _paired(runs, "lego", other, "global", "nll", n_boot=n_boot)
                out.append(_row("C1", name, "nll", res, thr_nll, "below", sc))
            return out
        attempt(c1)
    if {"lego", "local"} <= have:
        def c2():
            out = []
            levels = _client_levels(runs, "lego")
            for level, own in sorted(levels.items()):
                x, _ = item_cells(runs, "lego", level, "correct")
                evaluated = sorted({t for _, t in x} - {HELDOUT})
                other = [t for t in evaluated if t not in own]
                if not other:
                    continue
                for value, metric, better in (("correct", "points", "above"), ("nll", "nll", "below")):
                    res, sc = _paired(runs, "lego", "local", level, value, other, n_boot)
                    out.append(_row("C2", f"lego - local, block {level}%, other tasks", metric, res, 0.0, better,
                                    sc, sparsity=level))
            return out
        attempt(c2)
    if {"lego", "base"} <= have:
        def c3():
            res, _ = _paired(runs, "lego", "base", "global", "nll", [HELDOUT], n_boot)
            out = [_row("C3", "lego - base, held-out text", "nll", res,
                        math.log1p(thresholds["c3_ppl_relative"]), "below", None)]
            trained = {t for _, r in seed_results(runs) for c in r.get("clients", []) for t in c.get("tasks", [])}
            x, _ = item_cells(runs, "lego", "global", "correct")
            untouched = sorted({t for _, t in x} - trained - {HELDOUT})
            if untouched:
                res, sc = _paired(runs, "lego", "base", "global", "correct", untouched, n_boot)
                row = _row("C3", f"lego - base, untouched tasks ({', '.join(untouched)})", "points", res,
                           math.nan, "above", sc)
                row["verdict"] = "reported"
                out.append(row)
            return out
        attempt(c3)
    return pd.DataFrame(rows)


_RANK = {"not judged": -1, "not held": 0, "inconclusive": 1, "held": 2}


def claim_verdicts(ev: pd.DataFrame) -> dict[str, dict[str, str]]:
    """``{claim: {metric: verdict}}``: a claim holds on a metric when every one of its tests holds, is not held
    when any test is not held, and is inconclusive otherwise."""
    out: dict[str, dict[str, str]] = {}
    if ev.empty:
        return out
    for (claim, metric), g in ev[ev["verdict"] != "reported"].groupby(["claim", "metric"], sort=True):
        out.setdefault(claim, {})[metric] = min(g["verdict"], key=_RANK.__getitem__)
    return out


def evidence_table(ev: pd.DataFrame) -> pd.DataFrame:
    """The evidence as a readable table: ``claim, test, metric, margin [95% CI], threshold, verdict, mde``."""
    if ev.empty:
        return ev

    def fmt(v: float, metric: str) -> str:
        return f"{v:+.1f}" if metric == "points" else f"{v:+.3f}"

    rows = []
    for _, r in ev.iterrows():
        thr = "" if math.isnan(r["threshold"]) else ("≥ " if r["better"] == "above" else "≤ ") + fmt(
            r["threshold"], r["metric"])
        rows.append({"claim": r["claim"], "test": r["test"], "metric": r["metric"],
                     "margin [95% CI]": f"{fmt(r['estimate'], r['metric'])} [{fmt(r['low'], r['metric'])}, "
                                        f"{fmt(r['high'], r['metric'])}]",
                     "holds if": thr, "verdict": r["verdict"], "mde": f"{r['mde']:.2f}" if r["metric"] == "points"
                     else f"{r['mde']:.3f}", "items": int(r["items"]), "seeds": int(r["seeds"]),
                     "scoring": r["scoring"] or "-"})
    return pd.DataFrame(rows)


def detectable_effect(n: int, tasks: int, seeds: int = 1, discordance: float = 0.2, power: float = 0.8) -> float:
    """The C1 margin (points) a design can detect before it runs: paired 0/1 items disagree with probability
    ``discordance`` (variance of a difference ~ discordance), ``n`` items per task, ``tasks`` tasks, equal weights.

    Returns ``(z_{0.975} + z_power) * se`` in points, with ``se = 100 sqrt(discordance / (tasks n seeds))``.
    """
    se = 100 * math.sqrt(discordance / (tasks * n * seeds))
    z = NormalDist().inv_cdf
    return (z(0.975) + z(power)) * se
