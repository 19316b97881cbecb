"""The tasks: each benchmark's raw row parser, its prompt builder, and ``TASKS``, the one table of them.

A stored record (what ``prepared.prepare`` writes: the raw fields, a ``uid``) becomes an ``Example`` through its
task's ``build``, so a prompt's wording lives here only; ``prompts.render`` adds the chat template. A choice
example has two forms, and training uses the one its scoring reads (``names.TRAIN_FORMATS``): the chat prompt
answered with a label (``yes``/``no`` or the option letter; ``Example.choices``,
``response == choices[answer_index]``), and the cloze form (``context``, then each option's own text).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from legokit.names import CHOICE_TASK_NAMES, TASK_NAMES

# Character caps keep CPU prompts short.
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


def clean_text(text: str) -> str:
    """``text`` with every run of whitespace made one space, stripped."""
    return " ".join(str(text).split())


def _clip(text: str, limit: int) -> str:
    """Cut at the last word boundary before ``limit`` characters."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def _as_question(text: str) -> str:
    text = clean_text(text)
    text = text[:1].upper() + text[1:]
    return text if text.endswith("?") else text + "?"


def _parse_options(text: str, expected: int) -> list[str] | None:
    """``"A. x\\nB. y"`` -> ``["x", "y"]``; options may span lines. None unless exactly A.. in order."""
    heads = list(re.finditer(r"(?:^|\n)[ .]*([A-J])\. ", text))
    if [m.group(1) for m in heads] != list(LETTERS[:expected]):
        return None
    bounds = [m.end() for m in heads] + [len(text)]
    starts = [m.start() for m in heads[1:]] + [len(text)]
    return [clean_text(text[bounds[i]:starts[i]]) for i in range(expected)]


def _choice_prompt(stem: str, options: Sequence[str], instruction: str) -> str:
    listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{stem}\n\n{listed}\n\n{instruction}"


# ---------------------------------------------------------------- per-task parse / build


def _parse_boolq(row: dict) -> dict | None:
    ans = str(row.get("answer", "")).lower()
    if ans not in ("true", "false") or not row.get("passage"):
        return None
    return {"title": clean_text(row.get("title", "")), "passage": clean_text(row["passage"]),
            "question": clean_text(row["question"]), "answer": ans == "true"}


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
    answers = [clean_text(a) for a in row.get("answer", []) if clean_text(a)]
    return {"question": clean_text(row["question"]), "answers": answers} if answers else None


def _build_nq(r: dict) -> Example:
    prompt = f"{_as_question(r['question'])}\nAnswer with a short phrase."
    return Example("nq_open", prompt, r["answers"][0], uid=r["uid"], answers=tuple(r["answers"]))


def _parse_xsum(row: dict) -> dict | None:
    doc, summary = row.get("document", "").strip(), clean_text(row.get("summary", ""))
    return {"document": doc, "summary": summary} if doc and summary else None


def _build_xsum(r: dict) -> Example:
    prompt = f"Summarize the article in one sentence.\n\n{_clip(clean_text(r['document']), DOCUMENT_CHARS)}"
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
        if clean_text(answer[3:]).rstrip("?").strip() != options[idx]:
            return None
        return {"question": clean_text(row["question"]), "options": options, "answer_index": idx}

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
                       context=f"Question: {context}{clean_text(r['question'])}\nAnswer:", options=tuple(r["options"]))

    return build


def _with_passage(parse: Callable[[dict], dict | None]) -> Callable[[dict], dict | None]:
    """``parse`` that also keeps the row's ``passage`` (SIQA's situation) when it has one."""
    def parse_passage(row: dict) -> dict | None:
        rec = parse(row)
        if rec is None or not clean_text(row.get("passage", "")):
            return None
        return {"passage": clean_text(row["passage"]), **rec}

    return parse_passage


_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?(?:/\d+)?)(?:\s|$)")


def _parse_asdiv(row: dict) -> dict | None:
    m = _NUMBER.match(str(row.get("answer", "")))  # drops the answers that are not numbers
    if not m:
        return None
    return {"passage": clean_text(row["passage"]), "question": clean_text(row["question"]), "answer": m.group(1)}


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
                     build=_choice_builder("mmlu", clean_text, "Answer with the letter of the correct option.")),
    "commonsense_qa": TaskSpec(
        "commonsense_qa", "choice", _CHOICE, "CommonsenseQA/validation.jsonl",
        parse=_options_parser(5, strip_qmark=True),
        build=_choice_builder("commonsense_qa", clean_text, "Answer with the letter of the correct option.")),
    "asdiv": TaskSpec("asdiv", "generate", _NUMBER_ANSWER, "ASDiv/test.jsonl", 16, _parse_asdiv, _build_asdiv),
    "piqa": TaskSpec("piqa", "choice", _CHOICE, "PIQA/validation.jsonl", parse=_options_parser(2),
                     build=_choice_builder("piqa", lambda q: f"Goal: {clean_text(q)}\nWhich solution works better?",
                                           "Answer with A or B.")),
    # Social IQa (a situation, a question about people's motives or reactions, 3 options) and OpenBookQA
    # (elementary science, 4 options): short cloze items a small client can learn (docs/results.md).
    "siqa": TaskSpec("siqa", "choice", _CHOICE, "SIQA/test.jsonl", parse=_with_passage(_options_parser(3)),
                     build=_choice_builder("siqa", clean_text, "Answer with the letter of the correct option.")),
    "openbookqa": TaskSpec("openbookqa", "choice", _CHOICE, "OpenBookQA/test.jsonl", parse=_options_parser(4),
                           build=_choice_builder("openbookqa", clean_text,
                                                 "Answer with the letter of the correct option.")),
}
assert tuple(TASKS) == TASK_NAMES, "legokit.names.TASK_NAMES must list TASKS, in order (config validates with it)"
assert {t for t, s in TASKS.items() if s.kind == "choice"} == set(CHOICE_TASK_NAMES), "names.CHOICE_TASK_NAMES"
