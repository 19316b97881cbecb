"""legokit's harness scoring against lm-evaluation-harness 0.4.13 itself, item by item.

``export_tasks`` writes the items, lm-eval scores them in-process (``simple_evaluate`` on an ``HFLM`` around the
same in-memory model), and every option's summed log-probability, every item's ``acc`` / ``acc_norm`` and the
aggregates must agree with ``legokit.evaluate.score_items(..., scoring="harness")``. A fast version runs on
tiny-llama with synthetic items; the slow one on the default LLM and real test items. ROUGE-L is checked
against the ``rouge_score`` package (the reference lm-eval and most papers use).
"""

from __future__ import annotations

import math

import pytest

from legokit.data import Example
from legokit.lmeval import choice_tasks, export_tasks, lm_eval_command, task_yaml
from legokit.utils import LegokitError

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the test extra: pip install -e .[test]")


@pytest.fixture(scope="module", autouse=True)
def offline():
    """lm-eval loads the exported jsonl with datasets' json builder: never ask a hub."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def _lm_eval_samples(model, tokenizer, task_dir, tasks: list[str]) -> dict:
    """``{task: {"results": {...}, "items": {uid: sample}}}`` from lm-eval run in-process."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device=str(next(model.parameters()).device))
    # include_defaults=False: our tasks only (indexing lm-eval's ~10k built-in YAMLs costs seconds, changes nothing)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    names = [f"legokit_{t}" for t in tasks]
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, log_samples=True)
    return {t: {"results": out["results"][n], "items": {s["doc"]["uid"]: s for s in out["samples"][n]}}
            for t, n in zip(tasks, names, strict=True)}


def _compare(task: str, records: list[dict], harness: dict, atol: float) -> float:
    """Assert per-item and aggregate agreement; return the worst per-option log-probability difference."""
    items = harness["items"]
    assert sorted(items) == sorted(r["uid"] for r in records), f"{task}: lm-eval scored other items"
    worst = 0.0
    for rec in records:
        s = items[rec["uid"]]
        theirs = [float(ll) for ll, _ in s["filtered_resps"]]
        assert len(theirs) == len(rec["option_logprobs"])
        diff = max(abs(a - b) for a, b in zip(rec["option_logprobs"], theirs, strict=True))
        worst = max(worst, diff)
        assert diff <= atol, f"{task} {rec['uid']}: legokit {rec['option_logprobs']} vs lm-eval {theirs}"
        assert float(rec["correct"]) == s["acc"], f"{task} {rec['uid']}: acc differs"
        assert float(rec["acc_norm"]) == s["acc_norm"], f"{task} {rec['uid']}: acc_norm differs"
    n = len(records)
    assert math.isclose(harness["results"]["acc,none"], sum(float(r["correct"]) for r in records) / n, abs_tol=1e-12)
    assert math.isclose(harness["results"]["acc_norm,none"], sum(float(r["acc_norm"]) for r in records) / n,
                        abs_tol=1e-12)
    return worst


# ----- unit: no assets ---------------------------------------------------------------------------------------
def test_export_refuses_unknown_and_generative_tasks(tmp_path):
    valid = ", ".join(choice_tasks())
    assert set(choice_tasks()) == {"boolq", "mmlu", "commonsense_qa", "piqa", "siqa", "openbookqa"}
    for bad in ("xsum", "hellaswag"):
        with pytest.raises(LegokitError, match=f"valid tasks are {valid}"):
            export_tasks(tmp_path, tasks=["piqa", bad])
    with pytest.raises(LegokitError, match="at least one item"):
        export_tasks(tmp_path, tasks=["piqa"], n=0)
    assert not list(tmp_path.iterdir())  # nothing written before the checks pass


def test_task_yaml_and_command(tmp_path):
    cfg = task_yaml("piqa", tmp_path / "piqa.jsonl")
    assert cfg["task"] == "legokit_piqa" and cfg["dataset_path"] == "json" and cfg["target_delimiter"] == " "
    assert cfg["dataset_kwargs"] == {"data_files": {"test": str(tmp_path / "piqa.jsonl")}}
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc", "acc_norm"]
    cmd = lm_eval_command(tmp_path, ["piqa", "boolq"], pretrained="ckpt")
    assert f"--include_path {tmp_path.resolve()} --tasks legokit_piqa,legokit_boolq" in cmd
    assert "--model_args pretrained=ckpt" in cmd


# Synthetic cloze items: trailing whitespace on a context (moved onto the continuation), one- and many-character
# options of different lengths (acc and acc_norm can disagree), a gold that is not the first option.
SYNTHETIC = [
    Example("piqa", "", "B", ("A", "B"), 1, "syn-0", context="Question: how do you dry a wet towel?\nAnswer:",
            options=("hang it in the sun.", "put it in the freezer for an hour or two.")),
    Example("piqa", "", "A", ("A", "B"), 0, "syn-1", context="Question: what opens a locked door? \nAnswer: ",
            options=("a key", "a very small and rather old banana")),
    Example("piqa", "", "B", ("A", "B", "C"), 1, "syn-2",
            context="The sky is blue.\nQuestion: Is the sky blue?\nAnswer:", options=("yes", "no", "n")),
    Example("piqa", "", "C", ("A", "B", "C", "D"), 2, "syn-3", context="Question: 2 + 2 =\nAnswer:",
            options=("4", "22", "four", "5")),
]


def test_tiny_llama_scores_agree_with_lm_eval(tmp_path, monkeypatch):
    from legokit.evaluate import score_items
    from legokit.models import load_model

    monkeypatch.setattr("legokit.lmeval.load_task", lambda task, split: SYNTHETIC)
    (path,) = export_tasks(tmp_path, tasks=["piqa"])
    assert path == (tmp_path / "piqa.yaml").resolve() and (tmp_path / "piqa.jsonl").is_file()
    model, tok = load_model("tiny-llama")
    records = score_items(model, tok, "piqa", SYNTHETIC, scoring="harness")
    harness = _lm_eval_samples(model, tok, tmp_path, ["piqa"])["piqa"]
    assert harness["items"]["syn-1"]["arguments"][0] == ("Question: what opens a locked door? \nAnswer: ", " a key")
    _compare("piqa", records, harness, atol=1e-4)


# ----- ROUGE-L -----------------------------------------------------------------------------------------------
def _perturbed(text: str, i: int) -> list[str]:
    words = text.split()
    return [text, " ".join(reversed(words)), " ".join(words[::2]), text.upper() + " (BBC) -- 2017!",
            " ".join(words[i % 3:]) + " said the spokes-man's office", "", "!!!", f"{i} café naïve Über 5.3%"]


def _rouge_pairs(references: list[str]) -> list[tuple[str, str]]:
    return [(pred, ref) for i, ref in enumerate(references) for pred in _perturbed(ref, i)]


def test_rouge_l_equals_rouge_score_without_stemming():
    from rouge_score import rouge_scorer

    from legokit.metrics import rouge_l

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    refs = ["The UK's biggest retailer, Tesco, said profits rose 5.3% to £1.2bn in 2016-17.",
            "A man has been charged after a car hit 3 pedestrians in Cardiff city centre.",
            "Ça va? Über-fans queue overnight for the new iPhone X (64GB)."]
    for pred, ref in _rouge_pairs(refs):
        assert abs(rouge_l(pred, ref) - scorer.score(ref, pred)["rougeL"].fmeasure) <= 1e-9, (pred, ref)


# ----- slow: the default LLM on real test items -----------------------------------------------------------------
# Items per task: about 2 minutes on 2 busy CPU cores, both scorers included (a BoolQ item is ~260 tokens, and
# lm-eval computes the 49k-vocabulary logits at every position).
SLOW_N = {"piqa": 32, "boolq": 12, "commonsense_qa": 24}


@pytest.mark.slow
def test_default_llm_harness_scores_agree_with_lm_eval(tmp_path):
    from legokit.data import load_task
    from legokit.evaluate import score_items
    from legokit.models import load_model

    model, tok = load_model(device="cpu")
    for task, n in SLOW_N.items():
        export_tasks(tmp_path, tasks=[task], n=n)
    harness = _lm_eval_samples(model, tok, tmp_path, list(SLOW_N))
    worst = {}
    for task, n in SLOW_N.items():
        records = score_items(model, tok, task, load_task(task, "test")[:n], scoring="harness")
        worst[task] = _compare(task, records, harness[task], atol=1e-3)
    print("worst per-option |legokit - lm-eval| log-prob difference:", worst)


@pytest.mark.slow
def test_rouge_l_on_xsum_items_equals_rouge_score():
    from rouge_score import rouge_scorer

    from legokit.data import load_task
    from legokit.metrics import rouge_l

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    examples = load_task("xsum", "test")[:40]
    refs = [ex.answers[0] for ex in examples]
    pairs = _rouge_pairs(refs) + [(ex.prompt[:300], ex.answers[0]) for ex in examples]
    for pred, ref in pairs:
        assert abs(rouge_l(pred, ref) - scorer.score(ref, pred)["rougeL"].fmeasure) <= 1e-9, (pred, ref)
    assert any(0 < rouge_l(p, r) < 1 for p, r in pairs)
