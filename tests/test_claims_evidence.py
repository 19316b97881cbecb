"""Interval verdicts from per-item records (``legokit.evidence``): synthetic run directories whose answer is known
by construction."""

import json
import math

import numpy as np
import pytest

from legokit import evidence
from legokit.experiment import run_conditions
from legokit.utils import LegokitError

TASKS = ["boolq", "piqa"]
N = 300


def write_items(path, p_correct: dict, nll: float, rng, scoring="harness", n=N, seed=0, window_nll=None):
    """Items of every task: correct ~ Bernoulli(p), nll ~ N(nll, 0.3); uids drawn per seed like the scorer's."""
    rows = []
    for task in TASKS:
        for i in range(n):
            rows.append({"uid": f"{task}-{seed}-{i:04d}", "task": task, "scoring": scoring,
                         "correct": float(rng.random() < p_correct[task]),
                         "nll": float(nll + 0.3 * rng.standard_normal())})
    for i in range(40):
        rows.append({"uid": f"window-{i:03d}", "task": "heldout_text",
                     "nll": float((window_nll if window_nll is not None else 3.0) + 0.05 * rng.standard_normal())})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def condition(tmp, cond, seed, rng, glob=None, blocks=None, scoring="harness"):
    """A result dict as run_condition writes it, with the items beside it (``run_dir`` as claims.load_* add)."""
    d = tmp / f"s{seed}" / cond
    r = {"condition": cond, "seed": seed, "clients": [], "run_dir": str(d)}
    if glob is not None:
        p, nll, wnll = glob
        write_items(d / "items" / "global.jsonl", p, nll, rng, scoring, seed=seed, window_nll=wnll)
        r["global"] = {"items": "global.jsonl", "primary": {t: p[t] for t in TASKS},
                       "mean_score": np.mean(list(p.values())), "perplexity": math.exp(wnll)}
    for k, (level, (p, nll)) in enumerate((blocks or {}).items()):
        name = f"block-{level}.jsonl"
        write_items(d / "items" / name, p, nll, rng, scoring, seed=seed)
        prim = {t: p[t] for t in TASKS}
        r["clients"].append({"client": k, "block": f"b{level}", "sparsity": level / 100, "tasks": ["boolq"],
                             "scores": {"items": name, "primary": prim, "mean_score": np.mean(list(prim.values())),
                                        "perplexity": 20.0},
                             "own_task_score": p["boolq"], "other_task_score": p["piqa"]})
    return r


def experiment(tmp, lego=0.75, dense=0.75, fedavg=0.55, lego_other=0.7, local_other=0.5, seeds=(0,), scoring=None):
    rng = np.random.default_rng(0)
    runs = {c: [] for c in ("base", "local", "fedavg_dense", "fedavg", "lego")}
    for s in seeds:
        both = lambda v: {"boolq": v, "piqa": v}  # noqa: E731
        runs["base"].append(condition(tmp, "base", s, rng, (both(0.5), 2.0, 3.0)))
        runs["local"].append(condition(tmp, "local", s, rng, None, {0: (both(local_other), 1.5),
                                                                    50: (both(local_other), 1.5)}))
        runs["fedavg_dense"].append(condition(tmp, "fedavg_dense", s, rng, (both(dense), 1.0, 3.0)))
        runs["fedavg"].append(condition(tmp, "fedavg", s, rng, (both(fedavg), 1.6, 3.0), scoring=scoring or "harness"))
        runs["lego"].append(condition(tmp, "lego", s, rng, (both(lego), 1.0, 3.0),
                                      {0: (both(lego_other), 1.0), 50: (both(lego_other), 1.0)}))
    return runs


def test_clear_effects_are_held_with_intervals_that_contain_the_truth(tmp_path):
    ev = evidence.evidence(experiment(tmp_path, lego=0.8, seeds=(0, 1, 2)), n_boot=500)
    c1 = ev[(ev["claim"] == "C1") & (ev["metric"] == "points")].set_index("test")
    # lego - fedavg: true +25 points; 1800 items per model: the interval is a few points wide and contains 25
    assert c1.loc["lego - fedavg", "low"] < 25 < c1.loc["lego - fedavg", "high"]
    assert c1.loc["lego - fedavg", "high"] - c1.loc["lego - fedavg", "low"] < 12
    assert evidence.claim_verdicts(ev)["C1"] == {"points": "held", "nll": "held"}
    assert evidence.claim_verdicts(ev)["C2"] == {"points": "held", "nll": "held"}
    c2 = ev[(ev["claim"] == "C2") & (ev["metric"] == "points")]
    assert list(c2["sparsity"]) == [0, 50] and (c2["items"] == 3 * N).all()  # piqa only: boolq is the own task
    c3 = ev[ev["claim"] == "C3"].set_index("metric")
    assert c3.loc["nll", "verdict"] == "held" and abs(c3.loc["nll", "estimate"]) < 0.05
    assert c3.loc["points", "verdict"] == "reported"


def test_a_margin_near_the_threshold_is_inconclusive_and_a_clear_miss_is_not_held(tmp_path):
    # lego 3 points below dense: the C1 threshold is -2, the interval (±~5 points on 600 items) straddles it
    ev = evidence.evidence(experiment(tmp_path / "a", lego=0.72, dense=0.75, fedavg=0.60), n_boot=500)
    close = ev[(ev["test"] == "lego - fedavg_dense") & (ev["metric"] == "points")].iloc[0]
    assert close["low"] < -2 < close["high"] and close["verdict"] == "inconclusive"
    assert close["mde"] > 2  # the design cannot resolve a 2-point margin, and says so
    ev = evidence.evidence(experiment(tmp_path / "b", lego=0.45, dense=0.75), n_boot=500)
    assert evidence.claim_verdicts(ev)["C1"]["points"] == "not held"
    ev = evidence.evidence(experiment(tmp_path / "c", lego_other=0.3, local_other=0.5), n_boot=500)
    assert evidence.claim_verdicts(ev)["C2"]["points"] == "not held"


def test_evidence_refuses_mixed_scorings_and_names_them(tmp_path):
    with pytest.raises(LegokitError, match="lego was scored with 'harness' and fedavg with 'label'"):
        evidence.evidence(experiment(tmp_path, scoring="label"), n_boot=200)


def test_runs_without_items_give_no_rows_and_the_table_reads_well(tmp_path):
    runs = experiment(tmp_path)
    for r in runs["lego"]:
        del r["run_dir"]
    assert evidence.evidence(runs, n_boot=200).empty
    ev = evidence.evidence(experiment(tmp_path / "x"), n_boot=200)
    table = evidence.evidence_table(ev)
    assert {"margin [95% CI]", "holds if", "verdict", "mde", "scoring"} <= set(table.columns)
    assert table["scoring"].iloc[0] == "harness"
    assert table.loc[table["test"] == "lego - fedavg_dense", "holds if"].iloc[0] == "≥ -2.0"


def test_detectable_effect_warns_before_a_design_too_small_for_c1():
    assert evidence.detectable_effect(16, 6) > 2 > evidence.detectable_effect(2000, 6)
    # the formula: 2.80 x 100 sqrt(0.2 / (6 x 100))
    assert evidence.detectable_effect(100, 6) == pytest.approx(2.8016 * 100 * math.sqrt(0.2 / 600), rel=1e-3)


def test_run_conditions_warns_when_the_evaluation_cannot_resolve_c1(tmp_path, monkeypatch):
    import warnings

    import legokit.experiment as experiment
    from legokit.config import ExperimentConfig

    def fake_run_condition(cfg, condition, out_dir, resume=False, progress=True):
        res = {"condition": condition, "seed": cfg.seed, "clients": []}
        (out_dir / "results.json").write_text(json.dumps(res))
        return res

    monkeypatch.setattr(experiment, "run_condition", fake_run_condition)
    small = ExperimentConfig().with_overrides({"eval.n": 16, "eval.tasks": ["boolq", "piqa"]})
    with pytest.warns(UserWarning, match=r"eval.n=16 .* detects a C1 margin of about 2\d\.\d points"):
        run_conditions(small, ["base"], tmp_path / "small", progress=False)
    big = small.with_overrides({"eval.n": 4000})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_conditions(big, ["base"], tmp_path / "big", progress=False)
