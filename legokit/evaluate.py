"""Perplexity on held-out text and task scores: option log-likelihood accuracy, EM/F1, ROUGE-L, NLL.

Every score reads prompts through ``data.render`` / ``data.tokenize_example``, so evaluation sees
exactly the format training used.

* Choice tasks (boolq, mmlu, commonsense_qa, piqa): each choice label (``yes``/``no``, ``A``..``E``)
  is scored as the response continuation after the rendered prompt; the prediction is the choice
  with the highest **sum** log-probability of its tokens (no length normalisation: the labels are one
  token each for real tokenizers, and the sum is the probability of the exact response training
  maximises). When every label is a single token, one forward pass per example gives both the
  option scores and the NLL.
* nq_open, asdiv: greedy generation (16 new tokens), first line of the output; ``exact_match`` and
  token ``f1`` after SQuAD normalisation (asdiv's ``exact_match`` compares the first number).
* xsum: greedy generation (48 new tokens), ROUGE-L F1 (own LCS, lowercase alphanumeric tokens).
* ``nll``: teacher-forced mean negative log-likelihood per gold response token (end-of-turn
  included), for every task.

Scoring batches are left-padded with explicit position ids and only the logits of the last
positions are computed, which keeps the 49k-vocabulary projection small on CPU.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from fractions import Fraction

import torch
import torch.nn.functional as F

from legokit.data import TASKS, Example, choice_ids, load_task, prompt_ids, render, tokenize_example
from legokit.utils import LegokitError, progress_bar

# ---------------------------------------------------------------- string metrics

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


# ---------------------------------------------------------------- model helpers


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: torch.nn.Module, seed: int = 0) -> Iterator[None]:
    """eval() + inference mode + a private RNG state; training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            yield
    finally:
        model.train(was_training)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


def _left_pad(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _tail_logprobs(model, seqs: Sequence[Sequence[int]], keep: int, pad: int) -> torch.Tensor:
    """Log-probabilities at the last ``keep`` positions of each left-padded sequence: (B, keep, V)."""
    ids, mask = _left_pad(seqs, pad, _device(model))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens get 0.. regardless of padding
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
    return torch.log_softmax(logits[:, -keep:].float(), dim=-1)


def _continuation_scores(model, pairs: Sequence[tuple[list[int], list[int]]], pad: int,
                         batch_size: int, bar=None) -> list[tuple[float, int]]:
    """``[(sum log p(continuation | prompt), n tokens)]`` for ``(prompt_ids, continuation_ids)`` pairs."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for b in range(0, len(order), batch_size):
        chunk = order[b: b + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in chunk]
        keep = max(len(pairs[i][1]) for i in chunk) + 1
        logp = _tail_logprobs(model, seqs, keep, pad)  # (B, keep, V)
        for row, i in enumerate(chunk):
            cont = pairs[i][1]
            m = len(cont)
            # token t of the continuation is predicted at position keep-1-m+t of the tail
            steps = logp[row, keep - 1 - m: keep - 1]
            tgt = torch.tensor(cont, device=steps.device)
            out[i] = (steps.gather(-1, tgt[:, None]).sum().item(), m)
        if bar is not None:
            bar.update(len(chunk))
    return out


def generate(model, tokenizer, examples: Sequence[Example], max_new_tokens: int = 16,
             batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy responses (decoded, special tokens dropped, stripped) to the rendered prompts."""
    prompts = [prompt_ids(tokenizer, render(ex, tokenizer)[0]) for ex in examples]
    with _eval_mode(model):
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size,
                         progress_bar(total=len(prompts), desc="generate", leave=False, disable=not progress))


def _generate(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int,
              bar=None) -> list[str]:
    pad = _pad_id(tokenizer)
    out = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    old_side = getattr(tokenizer, "padding_side", None)
    tokenizer.padding_side = "left"  # decoder-only generation continues from the last real token
    try:
        for b in range(0, len(order), batch_size):
            chunk = order[b: b + batch_size]
            ids, mask = _left_pad([prompts[i] for i in chunk], pad, _device(model))
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for row, i in enumerate(chunk):
                out[i] = tokenizer.decode(gen[row, ids.shape[1]:], skip_special_tokens=True).strip()
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if old_side is not None:
            tokenizer.padding_side = old_side
    return out


# ---------------------------------------------------------------- public entry points


def perplexity(model, tokenizer, texts: Sequence[str], seq_len: int = 256, batch_size: int = 8) -> float:
    """exp(mean NLL per predicted token) over ``texts`` joined by EOS and cut into ``seq_len`` windows.

    The windows do not overlap; the first token of each has no context and is not scored; a final
    shorter window is kept when it has at least two tokens.
    """
    if not texts:
        raise LegokitError("perplexity needs at least one text")
    if seq_len < 2:
        raise LegokitError(f"seq_len={seq_len}; use at least 2 (typically 256-2048)")
    sep = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
    windows = [stream[i: i + seq_len] for i in range(0, len(stream), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    device = _device(model)
    total, count = 0.0, 0
    with _eval_mode(model):
        batches = [windows[i: i + batch_size] for i in range(0, len(windows), batch_size)]
        for batch in progress_bar(batches, desc="perplexity", leave=False):
            groups: dict[int, list[list[int]]] = {}
            for w in batch:  # only the last window can be shorter; it gets its own forward
                groups.setdefault(len(w), []).append(w)
            for group in groups.values():
                ids = torch.tensor(group, device=device)  # (B, T)
                logits = model(input_ids=ids).logits
                for row in range(ids.shape[0]):  # per row keeps the fp32 log-softmax copy small
                    total += F.cross_entropy(logits[row, :-1].float(), ids[row, 1:], reduction="sum").item()
                    count += ids.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count)))


def _kind(task: str, examples: Sequence[Example]) -> str:
    if task in TASKS:
        return TASKS[task].kind
    return "choice" if examples and examples[0].choices else "generate"


def evaluate_examples(model, tokenizer, task: str, examples: Sequence[Example], batch_size: int = 8,
                      bar=None) -> dict[str, float]:
    """Metrics of one task on given examples (see the module docstring for what each metric is)."""
    if not examples:
        raise LegokitError(f"no examples to evaluate for task {task!r}")
    kind = _kind(task, examples)
    pad = _pad_id(tokenizer)
    tokens = [tokenize_example(ex, tokenizer) for ex in examples]
    metrics: dict[str, float] = {}

    if kind == "choice":
        options = [choice_ids(ex, tokenizer) for ex in examples]
        fast = [all(len(o) == 1 for o in opts) and len({o[0] for o in opts}) == len(opts) for opts in options]
        # One forward of prompt + gold response gives the NLL and, for single-token labels, every option.
        nll_sum, nll_tok, correct = 0.0, 0, 0
        order = sorted(range(len(examples)), key=lambda i: -(len(tokens[i][0]) + len(tokens[i][1])))
        option_scores: dict[int, list[float]] = {}
        for b in range(0, len(order), batch_size):
            chunk = order[b: b + batch_size]
            keep = max(len(tokens[i][1]) for i in chunk) + 1
            logp = _tail_logprobs(model, [tokens[i][0] + tokens[i][1] for i in chunk], keep, pad)
            for row, i in enumerate(chunk):
                resp = tokens[i][1]
                m = len(resp)
                steps = logp[row, keep - 1 - m: keep - 1]  # (m, V): predictions of the response tokens
                nll_sum -= steps.gather(-1, torch.tensor(resp, device=steps.device)[:, None]).sum().item()
                nll_tok += m
                if fast[i]:
                    option_scores[i] = [steps[0, o[0]].item() for o in options[i]]
            if bar is not None:
                bar.update(len(chunk))
        slow = [(i, j) for i in range(len(examples)) if not fast[i] for j in range(len(options[i]))]
        if slow:
            scores = _continuation_scores(model, [(tokens[i][0], options[i][j]) for i, j in slow], pad,
                                          batch_size)
            for (i, _), (s, _) in zip(slow, scores, strict=True):
                option_scores.setdefault(i, []).append(s)
        for i, ex in enumerate(examples):
            s = option_scores[i]
            correct += int(max(range(len(s)), key=s.__getitem__) == ex.answer_index)
        metrics["accuracy"] = correct / len(examples)
        metrics["nll"] = nll_sum / nll_tok
        return metrics

    scores = _continuation_scores(model, tokens, pad, batch_size, bar)
    metrics_nll = -sum(s for s, _ in scores) / sum(m for _, m in scores)
    budget = TASKS[task].max_new_tokens if task in TASKS else 16
    preds = _generate(model, tokenizer, [p for p, _ in tokens], budget, batch_size, bar)
    golds = [ex.answers or (ex.response,) for ex in examples]
    if kind == "summarize":
        metrics["rouge_l"] = sum(max(rouge_l(p, g) for g in gs) for p, gs in zip(preds, golds, strict=True))
        metrics["rouge_l"] /= len(examples)
    else:
        preds = [p.strip().split("\n")[0] for p in preds]  # short answers: the first line is the answer
        em = number_match if task == "asdiv" else exact_match
        metrics["exact_match"] = sum(em(p, g) for p, g in zip(preds, golds, strict=True)) / len(examples)
        metrics["f1"] = sum(token_f1(p, g) for p, g in zip(preds, golds, strict=True)) / len(examples)
    metrics["nll"] = metrics_nll
    return metrics


def evaluate_tasks(
    model,
    tokenizer,
    tasks: str | Sequence[str] | Mapping[str, Sequence[Example]],
    split: str = "test",
    n: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Score a model on tasks.

    Args:
        tasks: task names (loaded with ``load_task(name, split)``) or ``{task: examples}``.
        split: which prepared split to read for named tasks.
        n: score only the first ``n`` examples of each task (splits are pre-shuffled: deterministic).
        batch_size: sequences per forward / generate call.
        seed: seeds a private torch RNG for the duration (greedy scoring uses none; kept for safety).
    Returns:
        ``{task: {metric: value}}``; metrics are ``accuracy`` (choice), ``exact_match`` and ``f1``
        (nq_open, asdiv), ``rouge_l`` (xsum), all in [0, 1], and ``nll`` for every task.
    """
    if n is not None and n < 1:
        raise LegokitError(f"n={n}; use a positive number of examples per task, or None for all")
    if batch_size < 1:
        raise LegokitError(f"batch_size={batch_size}; use at least 1")
    if isinstance(tasks, str):
        tasks = [tasks]
    data = dict(tasks) if isinstance(tasks, Mapping) else {t: load_task(t, split) for t in tasks}
    data = {t: list(exs)[:n] if n is not None else list(exs) for t, exs in data.items()}
    total = sum(len(exs) * (1 if _kind(t, exs) == "choice" else 2) for t, exs in data.items())
    results: dict[str, dict[str, float]] = {}
    with _eval_mode(model, seed), progress_bar(total=total, desc="evaluate", leave=False) as bar:
        for task, exs in data.items():
            bar.set_postfix_str(task)
            results[task] = evaluate_examples(model, tokenizer, task, exs, batch_size, bar)
    return results
