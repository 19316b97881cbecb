"""The claims of the LEGO experiment, read off the conditions' results: tables and verdicts.

LEGO (arXiv 2410.18287) claims, and this module tests, with the conditions of ``names.CONDITIONS``:

- **C1 model heterogeneity**: clients holding SLMs of different sparsity, aggregated with HeteAgg (``lego``),
  give a global LLM close to what homogeneous dense clients reach (``fedavg_dense``), and better than
  mask-agnostic averaging of the same heterogeneous clients (``fedavg``).
- **C2 data heterogeneity**: after LEGO each client's SLM scores higher on the tasks it never trained on than
  the same SLM fine-tuned on its own data only (``local``), without losing much on its own task.
- **C3 robustness**: the recombined LLM keeps its general ability: held-out corpus perplexity (and the tasks
  no client trained on) close to the untrained LLM (``base``).

Input everywhere: ``runs = {condition: results}`` where ``results`` is the dict ``experiment.run_condition``
returns (and writes to ``results.json``), or a list of such dicts, one per seed. Scores are reported in
**points** (0-100, the task's primary metric x 100); perplexity as is. With several seeds, tables keep one
row per seed (``global_table``, ``block_table``) or average them (``claims_table``); verdicts use the means.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from legokit.data import load_task
from legokit.evidence import (
    Runs,
    claim_verdicts,
    evidence,
    evidence_table,  # noqa: F401 (the experiment notebook calls it as claims.evidence_table)
    run_items,
    seed_results,
)
from legokit.learning import gain, gate
from legokit.names import CONDITIONS, THRESHOLDS
from legokit.sweepdir import is_seed, sweep_points
from legokit.utils import LegokitError

CLAIMS = {
    "C1": "model heterogeneity: HeteAgg over 0-75% sparse clients ~ dense FedAvg, and above mask-agnostic FedAvg",
    "C2": "data heterogeneity: LEGO blocks beat local-only blocks on the tasks they never saw, at every sparsity",
    "C3": "robustness: the recombined LLM keeps the base LLM's held-out perplexity (within +5%)",
}

_EPS = 1e-9  # thresholds are inclusive: +5.0% is within +5% despite float rounding


# ----- loading ---------------------------------------------------------------------------------------
def load_runs(run_dir: str | Path, conditions: Sequence[str] | None = None) -> dict[str, dict]:
    """``{condition: results}`` from ``run_dir/<condition>/results.json`` (all conditions found, or those named)."""
    run_dir = Path(run_dir)
    names = conditions or [p.parent.name for p in sorted(run_dir.glob("*/results.json"))]
    missing = [c for c in names if not (run_dir / c / "results.json").is_file()]
    if missing:
        raise LegokitError(f"no results for condition(s) {missing} under {run_dir}: run them first")
    return _ordered({c: {**json.loads((run_dir / c / "results.json").read_text()), "run_dir": str(run_dir / c)}
                     for c in names})


def load_sweep(sweep_dir: str | Path, where: Mapping[str, Any] | None = None,
               conditions: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """``{condition: [results, one per seed]}`` from the finished points of a ``legokit sweep`` of this notebook.

    Each point's ``RUN_DIR`` holds one directory per condition. Points are pooled over their seed (and over
    which conditions they ran); every other parameter must agree, so pass ``where`` (e.g.
    ``{"PARTITION": "task"}``) to pick one setting from a sweep that varies more. A (condition, seed) met twice
    is kept once.
    """
    where = dict(where or {})
    chosen, settings = [], {}
    for p in sweep_points(sweep_dir):
        if any(p.params.get(k) != v for k, v in where.items()):
            continue
        if p.status != "done":
            continue  # unfinished or failed point
        chosen.append(p)
        setting = {k: v for k, v in p.params.items() if not is_seed(k) and k not in ("CONDITIONS", "RUN_DIR")}
        settings[json.dumps(setting, sort_keys=True, default=str)] = setting
    if not chosen:
        raise LegokitError(f"no finished point of {sweep_dir} matches {where or 'anything'}")
    if len(settings) > 1:
        a, b = list(settings.values())[:2]
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise LegokitError(f"the points of {sweep_dir} differ in {keys} besides the seed: pass where= with one "
                           f"value for each (e.g. {{{keys[0]!r}: {a.get(keys[0])!r}}})")
    pooled: dict[str, list[dict]] = {}
    seen = set()
    for p in chosen:
        for res_file in sorted(p.dir.glob("*/results.json")):
            cond = res_file.parent.name
            if conditions is not None and cond not in conditions:
                continue
            res = {**json.loads(res_file.read_text()), "run_dir": str(res_file.parent)}
            key = (cond, res.get("seed"))
            if key not in seen:
                seen.add(key)
                pooled.setdefault(cond, []).append(res)
    return _ordered(pooled)


def _ordered(d: dict) -> dict:
    """``d`` with its conditions in the experiment's order (``CONDITIONS``); other names go last."""
    rank = {c: i for i, c in enumerate(CONDITIONS)}
    return dict(sorted(d.items(), key=lambda kv: rank.get(kv[0], len(CONDITIONS))))


# ----- tables ----------------------------------------------------------------------------------------------------
def global_table(runs: Runs) -> pd.DataFrame:
    """One row per (condition, seed) with a global LLM: ``condition, seed, <task> (points)..., mean_score,
    perplexity``. ``local`` has no global model and no row."""
    rows = []
    for cond, r in seed_results(runs):
        g = r.get("global")
        if not g:
            continue
        row = {"condition": cond, "seed": r.get("seed", 0)}
        row.update({t: 100 * float(v) for t, v in g["primary"].items()})
        row.update(mean_score=100 * float(g["mean_score"]), perplexity=float(g["perplexity"]))
        rows.append(row)
    return pd.DataFrame(rows)


def block_table(runs: Runs) -> pd.DataFrame:
    """One row per (condition, seed, client) whose block was scored: ``condition, seed, client, block,
    sparsity (%), own_tasks, own_task_score, other_task_score, mean_score`` (points), ``perplexity``.

    ``own`` = the tasks the client trained on, ``other`` = every other evaluated task (its primary metrics
    averaged); in federated conditions clients holding the same block share its scores.
    """
    rows = []
    for cond, r in seed_results(runs):
        for c in r.get("clients", []):
            if "scores" not in c:
                continue
            rows.append({"condition": cond, "seed": r.get("seed", 0), "client": c["client"], "block": c["block"],
                         "sparsity": round(100 * float(c["sparsity"])), "own_tasks": "+".join(c["tasks"]),
                         "own_task_score": _points(c.get("own_task_score")),
                         "other_task_score": _points(c.get("other_task_score")),
                         "mean_score": _points(c["scores"]["mean_score"]),
                         "perplexity": float(c["scores"]["perplexity"])})
    return pd.DataFrame(rows)


def _points(x: float | None) -> float:
    return math.nan if x is None else 100 * float(x)


def claims_table(runs: Runs) -> pd.DataFrame:
    """The claims table: one row per condition (seed means).

    Columns: each task's score of the global LLM, ``mean`` and ``ppl`` (global LLM), then per sparsity level
    ``s`` the blocks' ``own@s%`` and ``other@s%`` task scores (mean over the clients holding that level), and
    ``seeds``. Scores in points; NaN where a condition has no such model (``local``: no global LLM).
    """
    g, b = global_table(runs), block_table(runs)
    conds = list(_ordered({c: None for c, _ in seed_results(runs)}))
    table = pd.DataFrame(index=pd.Index(conds, name="condition"))
    if not g.empty:
        tasks = [c for c in g.columns if c not in ("condition", "seed", "mean_score", "perplexity")]
        means = g.groupby("condition", sort=False)[[*tasks, "mean_score", "perplexity"]].mean()
        table = table.join(means.rename(columns={"mean_score": "mean", "perplexity": "ppl"}))
    if not b.empty:
        per = b.groupby(["condition", "sparsity"], sort=True)[["own_task_score", "other_task_score"]].mean()
        for s in sorted(b["sparsity"].unique()):
            for col, short in (("own_task_score", "own"), ("other_task_score", "other")):
                vals = {cond: per.loc[(cond, s), col] for cond in conds if (cond, s) in per.index}
                table[f"{short}@{s}%"] = pd.Series(vals, dtype=float)
    table["seeds"] = pd.Series({c: len({r.get("seed", 0) for c2, r in seed_results(runs) if c2 == c}) for c in conds})
    return table


# ----- verdicts --------------------------------------------------------------------------------------------------
def _global_means(runs: Runs) -> dict[str, dict[str, float]]:
    g = global_table(runs)
    if g.empty:
        return {}
    return {c: row.to_dict() for c, row in g.groupby("condition").mean(numeric_only=True).iterrows()}


def _verdict(claim: str, held: bool | None, margin: float | None, detail: str, **numbers) -> dict:
    return {"claim": claim, "statement": CLAIMS[claim], "held": held,
            "verdict": "n/a" if held is None else ("held" if held else "not held"),
            "margin": None if margin is None or math.isnan(margin) else float(margin), "detail": detail,
            "numbers": {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                        for k, v in numbers.items()}}


def verdict_c1(runs: Runs, thresholds: Mapping[str, float] = THRESHOLDS) -> dict:
    """C1: lego's global mean score within ``c1_points`` points or ``c1_relative`` of fedavg_dense (or above it),
    and above fedavg. ``margin`` = lego - fedavg_dense (points)."""
    m = _global_means(runs)
    need = [c for c in ("lego", "fedavg_dense", "fedavg") if c not in m]
    if need:
        return _verdict("C1", None, None, f"needs the conditions {need} (with a global LLM)")
    lego, dense, fedavg = m["lego"]["mean_score"], m["fedavg_dense"]["mean_score"], m["fedavg"]["mean_score"]
    gap = lego - dense
    rel = gap / dense if dense else math.nan
    close = gap >= -thresholds["c1_points"] - _EPS or (dense > 0 and rel >= -thresholds["c1_relative"] - _EPS)
    above = lego > fedavg
    detail = (f"lego {lego:.1f} vs fedavg_dense {dense:.1f} ({gap:+.1f} points, {100 * rel:+.1f}%: "
              f"{'within' if close else 'outside'} {thresholds['c1_points']:g} points / "
              f"{100 * thresholds['c1_relative']:g}%); vs fedavg {fedavg:.1f} ({lego - fedavg:+.1f}: "
              f"{'above' if above else 'not above'})")
    return _verdict("C1", bool(close and above), gap, detail, lego=lego, fedavg_dense=dense, fedavg=fedavg,
                    gap_dense_points=gap, gap_dense_relative=rel, gap_fedavg_points=lego - fedavg)


def verdict_c2(runs: Runs, thresholds: Mapping[str, float] = THRESHOLDS) -> dict:
    """C2: at every sparsity level the lego blocks' other-task score beats the local blocks'.
    ``margin`` = the smallest per-level gain (points); the own-task change is reported alongside."""
    b = block_table(runs)
    if b.empty or not {"lego", "local"} <= set(b["condition"]):
        return _verdict("C2", None, None, "needs block scores of the conditions lego and local")
    per = b.groupby(["condition", "sparsity"])[["own_task_score", "other_task_score"]].mean()
    levels = sorted(set(per.loc["lego"].index) & set(per.loc["local"].index))
    other = {s: per.loc[("lego", s), "other_task_score"] - per.loc[("local", s), "other_task_score"] for s in levels}
    own = {s: per.loc[("lego", s), "own_task_score"] - per.loc[("local", s), "own_task_score"] for s in levels}
    valid = {s: v for s, v in other.items() if not math.isnan(v)}
    if not valid:
        return _verdict("C2", None, None, "no client has tasks it did not train on (other-task score undefined)")
    held = all(v > 0 for v in valid.values())
    worst = min(valid.values())
    parts = ", ".join(f"{s}%: other {other[s]:+.1f} / own {own[s]:+.1f}" for s in levels)
    own_vals = [v for v in own.values() if not math.isnan(v)]
    own_mean = float(np.mean(own_vals)) if own_vals else math.nan
    detail = (f"lego - local per sparsity ({parts}); other-task gain "
              f"{'> 0 at every level' if held else 'not > 0 at every level'} (min {worst:+.1f} points); "
              f"own-task change mean {own_mean:+.1f} points")
    return _verdict("C2", held, worst, detail, other_gain={str(s): v for s, v in other.items()},
                    own_change={str(s): v for s, v in own.items()}, min_other_gain=worst,
                    mean_own_change=own_mean)


def verdict_c3(runs: Runs, thresholds: Mapping[str, float] = THRESHOLDS) -> dict:
    """C3: lego's held-out perplexity at most ``c3_ppl_relative`` above base. ``margin`` = the relative
    change (0.03 = +3%). Tasks no client trained on are reported alongside (points, lego - base)."""
    m = _global_means(runs)
    need = [c for c in ("lego", "base") if c not in m]
    if need:
        return _verdict("C3", None, None, f"needs the conditions {need} (with a global LLM)")
    lego, base = m["lego"]["perplexity"], m["base"]["perplexity"]
    rel = lego / base - 1
    held = rel <= thresholds["c3_ppl_relative"] + _EPS
    trained = {t for _, r in seed_results(runs) for c in r.get("clients", []) for t in c.get("tasks", [])}
    untouched = [t for t in m["lego"] if t not in trained and t not in ("seed", "mean_score", "perplexity")
                 and t in m["base"]]
    delta = float(np.mean([m["lego"][t] - m["base"][t] for t in untouched])) if untouched else math.nan
    detail = (f"perplexity lego {lego:.2f} vs base {base:.2f} ({100 * rel:+.1f}%: "
              f"{'within' if held else 'above'} +{100 * thresholds['c3_ppl_relative']:g}%)")
    if untouched:
        detail += f"; untouched tasks ({', '.join(untouched)}): {delta:+.1f} points vs base"
    return _verdict("C3", bool(held), rel, detail, lego_perplexity=lego, base_perplexity=base,
                    perplexity_change=rel, untouched_tasks=untouched, untouched_change_points=delta)


def verdicts(runs: Runs, thresholds: Mapping[str, float] = THRESHOLDS) -> list[dict]:
    """The verdict of each claim: ``claim, statement, held (True | False | None), verdict ("held" | "not held"
    | "n/a"), margin, detail, numbers``; with several seeds, on the seed means plus how many seeds hold."""
    out = [verdict_c1(runs, thresholds), verdict_c2(runs, thresholds), verdict_c3(runs, thresholds)]
    seeds = sorted({r.get("seed", 0) for _, r in seed_results(runs)})
    if len(seeds) > 1:
        for v, fn in zip(out, (verdict_c1, verdict_c2, verdict_c3), strict=True):
            per = [fn({c: [r for c2, r in seed_results(runs) if c2 == c and r.get("seed", 0) == s] for c in runs},
                      thresholds)["held"] for s in seeds]
            known = [h for h in per if h is not None]
            v["seeds_held"] = f"{sum(known)}/{len(known)}"
            v["detail"] += f"; held in {sum(known)} of {len(known)} seeds"
    return out


def verdicts_table(vs: Sequence[dict]) -> pd.DataFrame:
    """The verdicts as a small table indexed by claim: ``verdict, margin`` (number), ``by`` (the margin with
    its unit: points for C1 and C2, percent for C3), ``seeds_held`` (several seeds only), ``detail``."""
    rows = []
    for v in vs:
        m = v["margin"]
        by = "" if m is None else (f"{100 * m:+.1f}%" if v["claim"] == "C3" else f"{m:+.1f} points")
        row = {"claim": v["claim"], "verdict": v["verdict"], "margin": m, "by": by}
        if "seeds_held" in v:
            row["seeds_held"] = v["seeds_held"]
        rows.append({**row, "detail": v["detail"]})
    return pd.DataFrame(rows).set_index("claim")


# ----- the learning gate -----------------------------------------------------------------------------------------
def learning(runs: Runs) -> dict:
    """Did the experiment learn? The claims' ``learning`` object (``legokit.learning``), over every seed loaded.

    ``clients``: the ``local`` condition's blocks, each on its own tasks, after training minus before (the
    per-item records ``legokit run`` keeps in ``items/learning-*.jsonl``), pooled over seeds; ``global``: the
    ``lego`` global LLM minus ``base`` on the trained tasks (the global LLMs' test items); ``gate``: passed or
    failed by ``learning.gate`` on the densest ``local`` client.

    Raises:
        LegokitError: ``base`` or ``local`` is not among the conditions, or a ``local`` run kept no learning
            records (it ran without ``eval.learning``).
    """
    missing = [c for c in ("base", "local") if c not in runs]
    if missing:
        raise LegokitError(f"the learning gate needs the conditions base and local; {' and '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} missing from {list(runs)}: add "
                           f"{', '.join(missing)} to CONDITIONS")
    per_client: dict[int, dict] = {}
    for cond, r in seed_results(runs):
        if cond != "local":
            continue
        if "run_dir" not in r or not r.get("learning"):
            raise LegokitError(f"the local condition (seed {r.get('seed', 0)}) has no learning records: rerun it "
                               "with eval.learning: true (the default) and this version of legokit")
        seed = r.get("seed", 0)
        for c in r["learning"]["clients"]:
            row = per_client.setdefault(c["client"], {"client": c["client"], "sparsity": c["sparsity"],
                                                     "tasks": c["tasks"], "before": [], "after": []})
            for when in ("before", "after"):
                recs = run_items(r["run_dir"], f"learning-{when}-client{c['client']}.jsonl")
                row[when] += [{**rec, "seed": seed} for rec in recs]
    examples = {t: load_task(t, "test") for c in per_client.values() for t in c["tasks"]}
    clients = []
    for c in per_client.values():
        exs = [ex for t in c["tasks"] for ex in examples[t]]
        clients.append({k: c[k] for k in ("client", "sparsity", "tasks")}
                       | gain(c["before"], c["after"], exs))
    out = {**gate(clients), "clients": clients, "global": None}
    trained = sorted({t for c in clients for t in c["tasks"]})
    if "lego" in runs:
        base, glob = [], []
        for cond, r in seed_results(runs):
            if cond in ("base", "lego") and r.get("global") and "items" in r["global"] and "run_dir" in r:
                recs = [{**rec, "seed": r.get("seed", 0)} for rec in run_items(r["run_dir"], r["global"]["items"])
                        if rec["task"] in trained]
                (base if cond == "base" else glob).extend(recs)
        if base and glob:
            exs = [ex for t in trained for ex in load_task(t, "test")]
            out["global"] = {"model": "lego global LLM - base", "tasks": trained, **gain(base, glob, exs)}
    scorings = {rec.get("scoring") for c in per_client.values() for rec in c["after"]} - {None}
    out["scoring"] = ", ".join(sorted(scorings)) or None
    return out


def _learning_or_none(runs: Runs) -> dict | None:
    """``learning(runs)``, or None where it cannot be judged (no base or local condition, or runs scored before
    the learning gate existed): the summary then records no gate instead of failing."""
    if not {"base", "local"} <= set(runs):
        return None
    try:
        return learning(runs)
    except LegokitError as err:
        if "no learning records" in str(err) or "is missing" in str(err):
            return None
        raise


def learning_table(learn: Mapping[str, Any]) -> pd.DataFrame:
    """The learning object as a table: one row per client (its block, own tasks) and one for the global LLM."""
    def ci(lo_hi) -> str:
        return f"[{lo_hi[0]:+.1f}, {lo_hi[1]:+.1f}]"

    rows = []
    for label, r in [(f"client {c['client']}", c) for c in learn.get("clients", [])] + (
            [("global LLM − base", learn["global"])] if learn.get("global") else []):
        bm, top, maj = r.get("beats_majority"), r.get("top_share_after"), r.get("majority")
        rows.append({"model": label, "sparsity": "" if r.get("sparsity") is None else f"{r['sparsity']:.0%}",
                     "tasks": ", ".join(r.get("tasks", [])), "before": round(r["before"], 1),
                     "after": round(r["after"], 1), "gain [95% CI]": f"{r['gain']:+.1f} {ci(r['ci'])}",
                     "after − majority [95% CI]": "–" if bm is None else f"{bm['margin']:+.1f} {ci(bm['ci'])}",
                     "top answer after": "–" if top is None else f"{top['share']:.0f}% {top['answer']}",
                     "majority answer": "–" if maj is None else f"{maj['share']:.0f}%",
                     "nll change [95% CI]": "–" if not r.get("nll") else
                     f"{r['nll']['change']:+.3f} [{r['nll']['ci'][0]:+.3f}, {r['nll']['ci'][1]:+.3f}]",
                     "items": r["items"]})
    return pd.DataFrame(rows).set_index("model") if rows else pd.DataFrame()


NOT_JUDGED = "not judged"


def apply_gate(learn: Mapping[str, Any] | None, vs: Sequence[dict] | None = None,
               ev: pd.DataFrame | None = None) -> tuple[list[dict] | None, pd.DataFrame | None]:
    """The verdicts as the learning gate allows them: unchanged when it passed (or was not run); when it failed,
    every verdict reads ``not judged`` (the margins stay, for the record): models that did not learn differ by
    noise, and a claim about them would be a claim about noise."""
    if not learn or learn.get("gate") != "failed":
        return (list(vs) if vs is not None else None), ev
    why = f"the experiment did not learn: {learn.get('reason', '')}"
    vs = None if vs is None else [{**v, "verdict": NOT_JUDGED, "held": None, "detail": why} for v in vs]
    if ev is not None and not ev.empty:
        ev = ev.assign(verdict=[NOT_JUDGED if v != "reported" else v for v in ev["verdict"]])
    return vs, ev


# ----- recording -------------------------------------------------------------------------------------------------
def summary(runs: Runs, vs: Sequence[dict] | None = None) -> dict:
    """The headline numbers for ``RUN_DIR/results.json``, flat enough for ``legokit sweep`` to collect.

    Keys (``legokit.report.flatten`` joins nested keys with dots): ``<condition>.mean_score``,
    ``<condition>.perplexity``, ``<condition>.<task>`` (global LLM, points), ``<condition>.own@<s>`` /
    ``other@<s>`` (blocks, points), ``verdict.C1`` ("held" | "not held" | "n/a"), ``held.C1`` (1 / 0 / None),
    ``margin.C1``, ``thresholds``, and ``seconds.<condition>`` (wall time of the run, seed mean).
    """
    vs = verdicts(runs) if vs is None else vs
    learn = _learning_or_none(runs)
    vs, _ = apply_gate(learn, vs)
    table = claims_table(runs)
    out: dict[str, Any] = {}
    for cond, row in table.iterrows():
        vals = {("mean_score" if k == "mean" else "perplexity" if k == "ppl" else k.rstrip("%")): _num(v)
                for k, v in row.items() if k != "seeds"}
        out[cond] = {k: v for k, v in vals.items() if v is not None}
        out[cond]["seeds"] = int(row["seeds"])
    out["verdict"] = {v["claim"]: v["verdict"] for v in vs}
    out["held"] = {v["claim"]: (None if v["held"] is None else int(v["held"])) for v in vs}
    out["margin"] = {v["claim"]: v["margin"] for v in vs}
    out["thresholds"] = dict(THRESHOLDS)
    _, ev = apply_gate(learn, ev=evidence(runs))
    if learn is not None:
        keys = ("sparsity", "before", "after", "gain", "ci")
        out["learning"] = {"gate": learn["gate"], "reason": learn["reason"],
                           "clients": {str(c["client"]): {k: c[k] for k in keys} for c in learn["clients"]},
                           "global": None if not learn.get("global") else {
                               k: learn["global"][k] for k in keys[1:]}}
    if not ev.empty:  # the interval verdicts, per claim and metric, and each test's margin with its interval
        out["ci_verdict"] = claim_verdicts(ev)
        out["ci"] = {f"{r['claim']}|{r['test']}|{r['metric']}": {k: _num(r[k]) for k in ("estimate", "low", "high",
                                                                                          "mde")}
                     for _, r in ev.iterrows()}
    secs = {}
    for cond, r in seed_results(runs):
        if isinstance(r.get("seconds"), Mapping) and "total" in r["seconds"]:
            secs.setdefault(cond, []).append(float(r["seconds"]["total"]))
    out["seconds"] = {c: round(float(np.mean(v)), 1) for c, v in secs.items()}
    return out


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else round(f, 4)
