"""The membership-inference audit (``legokit.audit``): its metrics on scores with a known answer, the reference
attack's arithmetic, who counts as a member, and ``audit_run`` / ``legokit audit`` on a finished tiny-llama run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import CALIB, have_data, make_examples, tiny_config

from legokit.audit import (
    attack_scores,
    audit_run,
    audit_sets,
    audit_table,
    read_metrics,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
    trained_indices,
)
from legokit.blocks import extract_blocks
from legokit.cli import main
from legokit.data import encode
from legokit.evaluate import training_losses
from legokit.experiment import client_partitions, training_split
from legokit.federation import run_federation
from legokit.messages import client_seed
from legokit.models import load_model
from legokit.stats import two_sample_interval
from legokit.train import batch_loss, batch_order, make_batch
from legokit.utils import LegokitError, atomic_write_json

# Tests that read the prepared task data also carry `slow`, so `make test-fast` never needs assets (as test_flower).
needs_data = pytest.mark.skipif(not have_data(), reason="task data not prepared: run `legokit setup` first")


# ----- the metrics ---------------------------------------------------------------------------------------------
def test_perfectly_separated_scores_give_auc_and_tpr_one_with_a_degenerate_interval():
    members, nonmembers = [2.0, 3.0, 4.0], [0.0, 1.0, 1.5]
    assert roc_auc(members, nonmembers) == 1.0 and tpr_at_fpr(members, nonmembers) == 1.0
    assert two_sample_interval(members, nonmembers, roc_auc, n_boot=200) == (1.0, 1.0)
    assert roc_auc(nonmembers, members) == 0.0 and tpr_at_fpr(nonmembers, members) == 0.0  # the other way round


def test_identical_distributions_give_auc_near_half_and_an_interval_covering_it():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(size=400), rng.normal(size=400)
    auc = roc_auc(members, nonmembers)
    low, high = two_sample_interval(members, nonmembers, roc_auc, n_boot=500)
    assert abs(auc - 0.5) < 0.05 and low < 0.5 < high and high - low < 0.15
    low, high = two_sample_interval(members, nonmembers, lambda a, b: tpr_at_fpr(a, b, 0.01), n_boot=500)
    assert low <= 0.01 <= high  # at chance the TPR equals the FPR


def test_auc_counts_ties_half_as_a_hand_computation():
    # pairs (member, non-member): (1, 2) 0, (1, 0) 1, (2, 2) 0.5, (2, 0) 1, twice for the two members at 2 -> 4 / 6
    assert roc_auc([1.0, 2.0, 2.0], [2.0, 0.0]) == pytest.approx(4 / 6)
    assert roc_auc([1.0, 1.0], [1.0, 1.0]) == 0.5


def test_tpr_at_fpr_allows_floor_fpr_times_n_false_positives():
    nonmembers = np.arange(100.0)  # 1% of 100: one false positive allowed, so the cut is the second highest (98)
    assert tpr_at_fpr([99.5, 98.5, 98.0, 50.0], nonmembers, 0.01) == 0.5
    assert tpr_at_fpr([99.5, 98.5, 98.0, 50.0], nonmembers, 0.005) == 0.25  # none allowed: above 99
    fpr, tpr = roc_curve([3.0, 1.0], [2.0, 0.0])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]


def test_auc_and_tpr_agree_with_sklearn_on_tied_scores():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    members, nonmembers = np.round(rng.normal(0.4, 1, 150), 1), np.round(rng.normal(0, 1, 700), 1)  # many ties
    y = np.r_[np.ones(members.size), np.zeros(nonmembers.size)]
    s = np.r_[members, nonmembers]
    assert roc_auc(members, nonmembers) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = metrics.roc_curve(y, s, drop_intermediate=False)
    for alpha in (0.01, 0.05, 0.2):
        assert tpr_at_fpr(members, nonmembers, alpha) == pytest.approx(tpr[fpr <= alpha].max(), abs=1e-12)
    ours = roc_curve(members, nonmembers)
    assert np.allclose(ours[0], fpr) and np.allclose(ours[1], tpr)


def test_the_reference_attack_subtracts_the_reference_loss():
    assert attack_scores("loss", [1.0, 2.0]).tolist() == [-1.0, -2.0]
    assert attack_scores("reference", [1.0, 2.0], [3.0, 2.5]).tolist() == [2.0, 0.5]
    # members are hard examples whose loss fell by 0.3; the loss alone barely tells them apart, the reference does
    rng = np.random.default_rng(2)
    difficulty = rng.uniform(1, 5, 200)
    member = np.arange(200) < 100
    target = difficulty - 0.3 * member
    loss = attack_scores("loss", target)
    ref = attack_scores("reference", target, difficulty)
    assert roc_auc(ref[member], ref[~member]) == 1.0 > roc_auc(loss[member], loss[~member]) + 0.3
    with pytest.raises(LegokitError, match="reference model's losses"):
        attack_scores("reference", [1.0])
    with pytest.raises(LegokitError, match="unknown attack"):
        attack_scores("lira", [1.0])


def test_training_losses_is_the_loss_local_training_computes(tiny_varied):
    model, tok = tiny_varied
    examples = make_examples("asdiv", 3)
    got = training_losses(model, tok, examples, max_len=64, fmt="chat")
    model.eval()
    for ex, value in zip(examples, got, strict=True):
        loss, _ = batch_loss(model, make_batch([encode(ex, tok, 64, "chat")], tok.eos_token_id, pack=False))
        assert value == pytest.approx(loss.item(), rel=1e-4)


# ----- who is a member -------------------------------------------------------------------------------------------
METRICS = [{"round": 1, "client": 0, "status": "ok", "steps": 2}, {"round": 1, "client": 1, "status": "failed",
                                                                   "error": "TypeError: boom"},
           {"round": 2, "client": 0, "status": "ok", "steps": 2}, {"round": 2, "client": 1, "status": "failed",
                                                                   "error": "TypeError: boom"}]


def test_members_are_the_examples_the_local_steps_reached_in_the_rounds_a_client_trained():
    cfg = tiny_config()  # batch_size 2
    want = {i for r in (1, 2) for b in batch_order(10, 2, 2, client_seed(cfg.seed, r, 0)) for i in b}
    assert trained_indices(cfg, METRICS, 0, 10) == sorted(want) and len(want) < 10
    assert trained_indices(cfg, METRICS[:1], 0, 10) == sorted(i for b in batch_order(10, 2, 2, client_seed(0, 1, 0))
                                                               for i in b)
    assert trained_indices(cfg, METRICS, 1, 10) == []  # every round failed: nothing reached


def test_non_members_are_unseen_disjoint_across_clients_and_in_the_members_task_mix():
    cfg = tiny_config()
    parts = [make_examples("boolq", 6) + make_examples("asdiv", 2), make_examples("piqa", 8)]
    unseen = {"boolq": make_examples("boolq", 40)[6:], "asdiv": make_examples("asdiv", 40)[2:],
              "piqa": make_examples("piqa", 40)[8:]}
    metrics = [{"round": 1, "client": k, "status": "ok", "steps": 4} for k in (0, 1)]
    sets = audit_sets(cfg, metrics, nonmembers=12, partitions=parts, unseen=unseen)
    trained = {ex.uid for p in parts for ex in p}
    for c, part in zip(sets, parts, strict=True):
        assert {ex.uid for ex in c["members"]} <= {ex.uid for ex in part} and len(c["members"]) == c["available"]
        assert len(c["nonmembers"]) == 12 and not {ex.uid for ex in c["nonmembers"]} & trained
        share = lambda exs, t: sum(ex.task == t for ex in exs) / len(exs)  # noqa: E731
        for t in {ex.task for ex in c["members"]}:
            assert share(c["nonmembers"], t) == pytest.approx(share(c["members"], t), abs=1 / 12)
    assert not {ex.uid for ex in sets[0]["nonmembers"]} & {ex.uid for ex in sets[1]["nonmembers"]}
    assert len(audit_sets(cfg, metrics, n=3, nonmembers=5, partitions=parts, unseen=unseen)[0]["members"]) == 3
    with pytest.raises(LegokitError, match=r"n=9 members asked for, but client 0's local steps reached only \d"):
        audit_sets(cfg, metrics, n=9, partitions=parts, unseen=unseen)
    with pytest.raises(LegokitError, match="holds only 32 examples no client was dealt: lower nonmembers"):
        audit_sets(cfg, metrics, nonmembers=40, partitions=parts, unseen=unseen)
    with pytest.raises(LegokitError, match="no client trained"):
        audit_sets(cfg, [{**m, "error": "x"} for m in metrics], partitions=parts, unseen=unseen)


@needs_data
@pytest.mark.slow
def test_the_default_non_members_are_never_dealt_to_any_client():
    cfg = tiny_config(data={"train_examples": 16})
    dealt = {ex.uid for part in client_partitions(cfg) for ex in part}
    for task in cfg.data.tasks:
        drawn, unseen = training_split(cfg, task)
        assert {ex.uid for ex in drawn} <= dealt and not {ex.uid for ex in unseen} & dealt
    metrics = [{"round": 1, "client": k, "status": "ok", "steps": 8} for k in (0, 1)]
    sets = audit_sets(cfg, metrics, nonmembers=30)
    assert not {ex.uid for c in sets for ex in c["nonmembers"]} & dealt


# ----- a finished run --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 2-round tiny-llama run on real task data, laid out as ``run_experiment`` writes it."""
    run = tmp_path_factory.mktemp("audit_run")
    cfg = tiny_config(device="cpu", train={"local_steps": 3})
    llm, tok = load_model(cfg.model)
    blocks = extract_blocks(llm, tok, sparsities=(0.0, 0.5), method="wanda", pattern="unstructured", n_calib=4,
                            seq_len=32, seed=0, texts=CALIB, progress=False)
    for i, b in enumerate(blocks):
        b.save(run / "blocks" / f"{i}")
    atomic_write_json(run / "blocks" / "index.json", {"blocks": [b.id for b in blocks]})
    run_federation(cfg, llm, tok, blocks, client_partitions(cfg), run, progress=False)
    return run


@needs_data
@pytest.mark.slow
def test_audit_run_attacks_the_global_llm_and_every_block(tiny_run, tmp_path):
    out = tmp_path / "audit.json"
    audit = audit_run(tiny_run, nonmembers=16, n_boot=200, out=out, progress=False)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(audit["rows"]))
    models = ["global LLM", "block wanda-unstructured-0 (client 0)", "block wanda-unstructured-50 (client 1)"]
    assert audit["models"] == models and audit["untrained_clients"] == []
    keys = [(r["model"], r["members_of"], r["attack"]) for r in audit["rows"]]
    groups = ("client 0", "client 1", "all")
    assert keys == [("base LLM", g, "loss") for g in groups] + [(m, g, a) for m in models for g in groups
                                                                 for a in ("loss", "reference")]
    for r in audit["rows"]:
        assert 0 <= r["auc_low"] <= r["auc"] <= r["auc_high"] <= 1 and 0 <= r["tpr_low"] <= r["tpr_high"] <= 1
        assert r["nonmembers"] == (32 if r["members_of"] == "all" else 16)
    # the reference is the untrained LLM, and the trained models' losses differ from it
    llm, tok = load_model("tiny-llama", device="cpu")
    cfg = tiny_config()
    exs = [ex for c in audit_sets(cfg, read_metrics(tiny_run, 2), nonmembers=16) for ex in c["members"]][:3]
    base = training_losses(llm, tok, exs, max_len=cfg.train.max_len, fmt=cfg.train.format)
    recs = [r for r in audit["examples"] if r["member"]][:3]
    assert [r["uid"] for r in recs] == [ex.uid for ex in exs]
    assert [r["loss"]["base LLM"] for r in recs] == pytest.approx(base, rel=1e-5)
    assert all(abs(r["loss"]["global LLM"] - r["loss"]["base LLM"]) > 1e-6 for r in recs)
    table = audit_table(audit)
    assert "global LLM" in table and "reference" in table and "at most 0 of 16 non-members above the threshold" in table


@needs_data
@pytest.mark.slow
def test_legokit_audit_prints_the_table_and_refuses_bad_input_before_loading(tiny_run, tmp_path, capsys,
                                                                             monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["audit", "--run", str(run), "--nonmembers", "8", "--n-boot", "100"]) == 0
    assert "membership-inference audit" in capsys.readouterr().out and (run / "audit.json").is_file()

    import legokit.lmeval

    def reached(*args, **kwargs):
        raise AssertionError("the model loaded before the bad input was refused")

    monkeypatch.setattr(legokit.lmeval, "load_model", reached)
    bad = {"--n": "1000", "--fpr": "1.5", "--n-boot": "10"}
    msgs = {"--n": "n=1000 members asked for", "--fpr": "fpr=1.5", "--n-boot": "n_boot=10"}
    for flag, value in bad.items():
        assert main(["audit", "--run", str(run), flag, value]) == 2
        assert msgs[flag] in capsys.readouterr().err
    assert main(["audit", "--run", str(run), "--out", str(tmp_path / "missing" / "a.json")]) == 2
    assert "cannot write" in capsys.readouterr().err
    shutil.rmtree(run / "adapters" / "round_002")
    assert main(["audit", "--run", str(run)]) == 2
    assert "round_002 is missing" in capsys.readouterr().err
    (run / "state.json").unlink()
    assert main(["audit", "--run", str(run)]) == 2
    assert "no finished round" in capsys.readouterr().err
