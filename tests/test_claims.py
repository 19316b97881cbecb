"""Claims tables and verdicts on synthetic result dicts (the layout ``experiment.run_condition`` writes)."""

import json
import math

import pytest

from legokit import claims
from legokit.experiment import run_conditions
from legokit.utils import LegokitError

TASKS = ["boolq", "piqa"]


def scores(boolq: float, piqa: float, ppl: float = 20.0) -> dict:
    prim = {"boolq": boolq, "piqa": piqa}
    return {"tasks": {t: {"accuracy": v} for t, v in prim.items()}, "primary": prim,
            "mean_score": (boolq + piqa) / 2, "perplexity": ppl}


def client(k: int, sparsity: float, s: dict, own: str = "boolq") -> dict:
    other = [v for t, v in s["primary"].items() if t != own]
    return {"client": k, "block": f"wanda-unstructured-{round(100 * sparsity)}", "sparsity": sparsity,
            "num_examples": 8, "tasks": [own], "scores": s, "own_task_score": s["primary"][own],
            "other_task_score": sum(other) / len(other)}


def run(cond: str, glob: dict | None, blocks: dict | None = None, seed: int = 0) -> dict:
    """One condition's results: the global LLM's scores and, per sparsity, one client's block scores."""
    clients = [client(k, s, sc) for k, (s, sc) in enumerate((blocks or {}).items())]
    r = {"condition": cond, "seed": seed, "clients": clients}
    if glob is not None:
        r["global"] = glob
    return r


def experiment(lego_mean=0.60, dense_mean=0.61, fedavg_mean=0.55, lego_ppl=20.5, base_ppl=20.0,
               lego_other=(0.50, 0.45), local_other=(0.40, 0.35), seed=0) -> dict:
    """Every condition the claims need, with the knobs that decide each verdict."""
    sc = lambda m, ppl=20.0: scores(m, m, ppl)  # noqa: E731
    return {
        "base": run("base", sc(0.40, base_ppl), seed=seed),
        "local": run("local", None, {0.0: scores(0.7, local_other[0]), 0.5: scores(0.6, local_other[1])}, seed),
        "fedavg_dense": run("fedavg_dense", sc(dense_mean), seed=seed),
        "fedavg": run("fedavg", sc(fedavg_mean), seed=seed),
        "lego": run("lego", sc(lego_mean, lego_ppl),
                    {0.0: scores(0.68, lego_other[0]), 0.5: scores(0.58, lego_other[1])}, seed),
    }


def by_claim(runs):
    return {v["claim"]: v for v in claims.verdicts(runs)}


def test_all_claims_hold_and_margins_are_measured():
    v = by_claim(experiment())
    assert [v[c]["verdict"] for c in ("C1", "C2", "C3")] == ["held"] * 3
    assert v["C1"]["margin"] == pytest.approx(-1.0)  # 60 vs 61 points
    assert v["C2"]["margin"] == pytest.approx(10.0)  # other-task gain at both levels: 10 points
    assert v["C2"]["numbers"]["own_change"] == {"0": pytest.approx(-2.0), "50": pytest.approx(-2.0)}
    assert v["C3"]["margin"] == pytest.approx(0.025)
    assert v["C3"]["numbers"]["untouched_tasks"] == ["piqa"]  # nobody trained on piqa


def test_c1_within_points_or_relative_and_above_fedavg():
    assert by_claim(experiment(lego_mean=0.595, dense_mean=0.61))["C1"]["held"] is True  # 1.5 points
    assert by_claim(experiment(lego_mean=0.575, dense_mean=0.61))["C1"]["held"] is False  # 3.5 pts, 5.7% rel
    assert by_claim(experiment(lego_mean=0.62, dense_mean=0.61))["C1"]["held"] is True  # above dense is fine
    v = by_claim(experiment(fedavg_mean=0.60))["C1"]  # equal to fedavg: not above it
    assert v["held"] is False and "not above" in v["detail"]


def test_c1_relative_rule_rescues_a_high_score():
    # 86 vs 90: 4 points (outside 2) but 4.4% relative (within 5%) -> close
    v = by_claim(experiment(lego_mean=0.86, dense_mean=0.90, fedavg_mean=0.5))["C1"]
    assert v["held"] is True and v["margin"] == pytest.approx(-4.0)
    assert v["numbers"]["gap_dense_relative"] == pytest.approx(-0.04 / 0.90)
    v = by_claim(experiment(lego_mean=0.55, dense_mean=0.60, fedavg_mean=0.5))["C1"]  # 5 pts, 8.3%
    assert v["held"] is False and "outside" in v["detail"]


def test_c2_needs_a_gain_at_every_sparsity_level():
    v = by_claim(experiment(lego_other=(0.50, 0.35)))["C2"]  # tie at 50%
    assert v["held"] is False and v["margin"] == pytest.approx(0.0)
    v = by_claim(experiment(lego_other=(0.30, 0.45)))["C2"]
    assert v["held"] is False and v["margin"] == pytest.approx(-10.0)


def test_c3_perplexity_threshold():
    assert by_claim(experiment(lego_ppl=21.0))["C3"]["held"] is True  # exactly +5%
    v = by_claim(experiment(lego_ppl=21.2))["C3"]
    assert v["held"] is False and v["margin"] == pytest.approx(0.06)


def test_missing_conditions_give_na_not_an_error():
    runs = experiment()
    del runs["fedavg_dense"], runs["local"]
    v = by_claim(runs)
    assert v["C1"]["verdict"] == "n/a" and "fedavg_dense" in v["C1"]["detail"]
    assert v["C2"]["verdict"] == "n/a"
    assert v["C3"]["verdict"] == "held"


def test_claims_table_layout_in_points():
    t = claims.claims_table(experiment())
    assert list(t.index) == ["base", "local", "fedavg_dense", "fedavg", "lego"]
    assert list(t.columns) == ["boolq", "piqa", "mean", "ppl", "own@0%", "other@0%", "own@50%", "other@50%", "seeds"]
    assert t.loc["lego", "mean"] == pytest.approx(60.0)
    assert t.loc["lego", "other@50%"] == pytest.approx(45.0)
    assert math.isnan(t.loc["local", "mean"])  # local has no global LLM
    assert math.isnan(t.loc["fedavg", "own@0%"])  # no block scores there
    assert (t["seeds"] == 1).all()


def test_seeds_are_averaged_and_counted():
    a, b = experiment(lego_mean=0.60, seed=0), experiment(lego_mean=0.50, seed=1)  # seed 1: C1 fails
    runs = {c: [a[c], b[c]] for c in a}
    g = claims.global_table(runs)
    assert len(g) == 2 * 4 and set(g["seed"]) == {0, 1}
    t = claims.claims_table(runs)
    assert t.loc["lego", "mean"] == pytest.approx(55.0) and t.loc["lego", "seeds"] == 2
    v = by_claim(runs)
    assert v["C1"]["held"] is False  # mean 55 vs 61
    assert v["C1"]["seeds_held"] == "1/2" and v["C3"]["seeds_held"] == "2/2"


def test_summary_is_flat_json_for_sweep_collection():
    from legokit.report import flatten

    s = claims.summary(experiment())
    flat = flatten(json.loads(json.dumps(s)))
    assert flat["lego.mean_score"] == pytest.approx(60.0)
    assert flat["lego.other@50"] == pytest.approx(45.0)
    assert flat["verdict.C1"] == "held" and flat["held.C2"] == 1
    assert flat["margin.C3"] == pytest.approx(0.025)
    assert "local.mean_score" not in flat  # NaN is left out, not written as NaN (invalid JSON)


def test_load_runs_and_sweep(tmp_path):
    runs = experiment()
    for seed in (0, 1):
        point = tmp_path / "sweep" / "points" / f"SEED={seed}"
        for cond, res in experiment(seed=seed).items():
            (point / cond).mkdir(parents=True)
            (point / cond / "results.json").write_text(json.dumps(res))
        (point / "results.json").write_text("{}")
    (tmp_path / "sweep" / "points" / "SEED=2").mkdir()  # unfinished point: ignored
    meta = {"defaults": {"PROFILE": "quick", "SEED": 0},
            "points": [{"name": f"SEED={s}", "params": {"SEED": s, "PROFILE": "quick"}} for s in (0, 1, 2)]}
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(meta))
    pooled = claims.load_sweep(tmp_path / "sweep")
    assert list(pooled) == list(runs) and all(len(v) == 2 for v in pooled.values())
    one = claims.load_runs(tmp_path / "sweep" / "points" / "SEED=0", ["lego", "base"])
    assert list(one) == ["base", "lego"]
    with pytest.raises(LegokitError, match="no results for condition"):
        claims.load_runs(tmp_path / "sweep" / "points" / "SEED=0", ["centralized"])


def test_load_sweep_refuses_mixed_settings(tmp_path):
    meta = {"defaults": {}, "points": [{"name": f"P={p}", "params": {"PARTITION": p, "SEED": 0}}
                                       for p in ("task", "dirichlet")]}
    for p in ("task", "dirichlet"):
        d = tmp_path / "points" / f"P={p}" / "lego"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(experiment()["lego"]))
        (d.parent / "results.json").write_text("{}")
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    with pytest.raises(LegokitError, match="PARTITION"):
        claims.load_sweep(tmp_path)
    assert len(claims.load_sweep(tmp_path, where={"PARTITION": "task"})["lego"]) == 1


def test_run_conditions_rejects_unknown_condition(tmp_path):
    from legokit.config import ExperimentConfig

    with pytest.raises(LegokitError, match="conditions"):
        run_conditions(ExperimentConfig(), ["lego", "fedprox"], tmp_path)


def test_verdicts_table_states_the_margin_with_its_unit():
    t = claims.verdicts_table(claims.verdicts(experiment()))
    assert list(t.index) == ["C1", "C2", "C3"]
    assert list(t["by"]) == ["-1.0 points", "+10.0 points", "+2.5%"]
    assert "seeds_held" not in t.columns


def test_run_conditions_shares_blocks_skips_finished_and_refuses_another_config(tmp_path, monkeypatch):
    import legokit.experiment as experiment
    from legokit.config import ExperimentConfig

    calls = []

    def fake_run_condition(cfg, condition, out_dir, resume=False, progress=True):
        blocks = out_dir / "blocks"
        calls.append((condition, (blocks / "index.json").is_file(), cfg.eval.base, cfg.eval.blocks))
        if not (blocks / "index.json").is_file():  # what load_or_extract_blocks does: extract and save
            blocks.mkdir(parents=True)
            (blocks / "index.json").write_text('{"blocks": []}')
        res = {"condition": condition, "seed": cfg.seed, "clients": []}
        (out_dir / "results.json").write_text(json.dumps(res))
        return res

    monkeypatch.setattr(experiment, "run_condition", fake_run_condition)
    cfg = ExperimentConfig()
    runs = run_conditions(cfg, ["lego", "base"], tmp_path, block_conditions=["lego"], progress=False)
    assert list(runs) == ["lego", "base"]
    # lego extracts; base reuses its blocks (hard-linked); the base LLM is scored by `base` only
    assert calls == [("lego", False, False, True), ("base", True, False, False)]
    assert (tmp_path / "base" / "blocks" / "index.json").stat().st_ino == \
        (tmp_path / "lego" / "blocks" / "index.json").stat().st_ino
    run_conditions(cfg, ["lego", "base"], tmp_path, block_conditions=["lego"], progress=False)
    assert len(calls) == 2  # both finished: loaded, not rerun
    with pytest.raises(LegokitError, match="another configuration"):
        run_conditions(cfg.with_overrides({"seed": 1}), ["lego"], tmp_path, block_conditions=["lego"])
    # a condition of another seed in the same directory does not borrow the seed-0 blocks
    run_conditions(cfg.with_overrides({"seed": 1}), ["fedavg"], tmp_path, progress=False)
    assert calls[-1] == ("fedavg", False, False, True)
