"""String metrics of generated answers: SQuAD exact match and token F1, numbers by value, ROUGE-L.

``evaluate.score_items`` scores generative tasks with these: nq_open by ``exact_match`` and ``token_f1`` after
SQuAD normalisation, asdiv by ``number_match`` (the first number, compared exactly), xsum by ``rouge_l``.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from fractions import Fraction

_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _golds(golds)))


def token_f1(prediction: str, golds: str | Sequence[str]) -> float:
    """SQuAD token F1 against the best-matching gold answer."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in _golds(golds):
        ref = normalize_answer(gold).split()
        if not pred or not ref:
            best = max(best, float(pred == ref))
            continue
        common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
        if common:
            p, r = common / len(pred), common / len(ref)
            best = max(best, 2 * p * r / (p + r))
    return best


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen twenty").split()


def first_number(text: str) -> Fraction | None:
    """The first number in ``text`` (digits, decimals, fractions, or a word zero..twenty), exactly."""
    m = _NUMBER.search(text)
    words = re.search(r"\b(" + "|".join(_WORDS) + r")\b", text.lower())
    if words and (m is None or words.start() < m.start()):
        return Fraction(_WORDS.index(words.group(1)))
    if m is None:
        return None
    try:
        return Fraction(m.group(0).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def number_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 when the first number of the prediction equals a gold number exactly."""
    pred = first_number(prediction)
    return float(pred is not None and any(pred == first_number(g) for g in _golds(golds)))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lowercase alphanumeric tokens (as ``rouge_score`` without stemming)."""
    pred, ref = re.findall(r"[a-z0-9]+", prediction.lower()), re.findall(r"[a-z0-9]+", reference.lower())
    lcs = _lcs(pred, ref) if pred and ref else 0
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)
