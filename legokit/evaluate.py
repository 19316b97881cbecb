"""Perplexity on held-out text and task scores, kept per test item: accuracy (two scorings), EM/F1, ROUGE-L, NLL.

Every score is first a per-item record (``score_items``: uid, prediction, correct, gold-response NLL, the
log-probability margin of the gold option over the best other one), so two models can be compared item by item
(``legokit.stats``); task metrics are the means of those records (``summarize``).

* Choice tasks (boolq, mmlu, commonsense_qa, piqa) have two scorings (``SCORINGS``; ``eval.scoring`` picks one and
  every table names it):
  - ``harness``, the field's convention (lm-evaluation-harness ``multiple_choice``): the summed log-likelihood
    of each option's own text (``" " + option``) after a plain cloze context (``Example.context``, no chat
    template); ``accuracy`` is lm-eval's ``acc`` (argmax of the sums) and ``acc_norm`` divides each sum by the
    option's length in characters. ``tests/test_lmeval.py`` pins agreement with lm-eval 0.4.13 item by item.
  - ``label``: each answer label (``yes``/``no``, ``A``..``E``) scored as the response to the chat prompt
    training uses; it measures answer-format following as much as knowledge.
* nq_open, asdiv: greedy generation (16 new tokens), first line of the output; ``exact_match`` and
  token ``f1`` after SQuAD normalisation (asdiv's ``exact_match`` compares the first number).
* xsum: greedy generation (48 new tokens), ROUGE-L F1 (own LCS, lowercase alphanumeric tokens; equal to the
  ``rouge_score`` package without stemming, tested).
* ``nll``: teacher-forced mean negative log-likelihood per gold response token (the chat response, or the
  gold option's text under ``harness``), per item; the task's ``nll`` is the item mean.
* ``training_losses``: an example's loss in its training form (``data.encode``), for the membership audit.

Likelihoods go through one scorer, ``likelihood.score_requests``; the string metrics live in ``legokit.metrics``.
``score_model`` scores a model the way an experiment does (``cfg.eval``) and keeps the per-item records in a JSON
lines file (``write_items`` / ``read_items``, the one reader of those files).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from legokit.config import ExperimentConfig
from legokit.data import (
    TASKS,
    Example,
    bos_prefix,
    choice_ids,
    encode,
    eval_texts,
    harness_requests,
    load_task,
    prompt_ids,
    render,
    tokenize_example,
)
from legokit.likelihood import score_requests, target_logprobs
from legokit.metrics import exact_match, number_match, rouge_l, token_f1
from legokit.names import SCORINGS
from legokit.utils import LegokitError, atomic_write_text, progress_bar

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


def perplexity(model, tokenizer, texts: Sequence[str], seq_len: int = 256, batch_size: int = 8, *,
               progress: bool = True) -> float:
    """exp(mean NLL per predicted token) over ``texts`` joined by EOS and cut into ``seq_len`` windows.

    The windows do not overlap; the first token of each has no context and is not scored, except that a
    tokenizer that starts every text with BOS (``data.bos_prefix``: Gemma's) gets BOS as each window's first
    token, so every text token is scored; a final shorter window is kept when it has at least two tokens.
    ``progress``: a progress bar over the windows.
    """
    return windows_perplexity(window_nlls(model, tokenizer, texts, seq_len, batch_size, progress=progress))


def windows_perplexity(windows: Sequence[tuple[float, int]]) -> float:
    """The perplexity of ``window_nlls``' windows: exp(summed NLL / predicted tokens), every token weighing the same."""
    return float(math.exp(sum(s for s, _ in windows) / sum(n for _, n in windows)))


def block_perplexity(block, tokenizer, texts: Sequence[str], seq_len: int = 256, batch_size: int = 8) -> float:
    """Perplexity of a ``Block``'s SLM on ``texts`` (``perplexity``); a model built for this is released
    afterwards, one the caller had built stays."""
    built = block.built
    try:
        return perplexity(block.model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size)
    finally:
        if not built:
            block.release()


def window_nlls(model, tokenizer, texts: Sequence[str], seq_len: int = 256,
                batch_size: int = 8, progress: bool = True) -> list[tuple[float, int]]:
    """``[(summed NLL, predicted tokens)]`` per window of ``perplexity``: the per-item records of held-out text."""
    if not texts:
        raise LegokitError("perplexity needs at least one text")
    if seq_len < 2:
        raise LegokitError(f"seq_len={seq_len}; use at least 2 (typically 256-2048)")
    sep = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
    pre = bos_prefix(tokenizer)  # Gemma reads a window without its BOS badly: every window starts with it
    step = seq_len - len(pre)
    windows = [pre + stream[i: i + step] for i in range(0, len(stream), step)]
    windows = [w for w in windows if len(w) >= 2]
    device = _device(model)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    out: list[tuple[float, int]] = []
    with _eval_mode(model):
        batches = [windows[i: i + batch_size] for i in range(0, len(windows), batch_size)]
        for batch in progress_bar(batches, desc="perplexity", leave=False, disable=not progress):
            groups: dict[int, list[list[int]]] = {}
            for w in batch:  # only the last window can be shorter; it gets its own forward
                groups.setdefault(len(w), []).append(w)
            for group in groups.values():
                ids = torch.tensor(group, device=device)  # (B, T)
                hidden = decoder(input_ids=ids).last_hidden_state  # (B, T, D); never (B, T, V) logits
                for row in range(ids.shape[0]):
                    logp = target_logprobs(head, hidden[row, :-1], ids[row, 1:])  # (T-1,)
                    out.append((-logp.double().sum().item(), ids.shape[1] - 1))
    return out


def _kind(task: str, examples: Sequence[Example]) -> str:
    if task in TASKS:
        return TASKS[task].kind
    return "choice" if examples and examples[0].choices else "generate"


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)  # the first maximum, as numpy.argmax


def _margin(scores: Sequence[float], gold: int) -> float:
    others = [v for j, v in enumerate(scores) if j != gold]
    return scores[gold] - max(others) if others else math.inf


def score_items(model, tokenizer, task: str, examples: Sequence[Example], *, scoring: str = "label",
                batch_size: int = 8, bar=None) -> list[dict]:
    """One record per example: what the model predicted, whether it was right, and how sure it was.

    Args:
        scoring: for choice tasks, ``"label"`` (the chat prompt training uses; each answer label is scored as
            the response) or ``"harness"`` (lm-evaluation-harness's multiple choice: each option's own text after
            the plain cloze context, ``acc`` and ``acc_norm``). Generative tasks are scored the same under both.
        batch_size: sequences per generation call (likelihoods are packed by tokens, see ``score_requests``).
    Returns:
        dicts with ``uid, task, scoring, prediction`` (option index, or the generated answer), ``correct`` (the
        item's primary metric: 1/0 accuracy, token F1, exact match or ROUGE-L), ``nll`` (mean negative
        log-likelihood per token of the gold response: the chat response under ``label`` and for generative
        tasks, the gold option's text under ``harness``), ``tokens`` (its token count), ``margin`` (choice: summed
        log-probability of the gold option minus the best other option; > 0 iff right, ties aside) and
        ``option_logprobs``; ``harness`` adds ``acc_norm``; generative tasks add their metrics.
    """
    if scoring not in SCORINGS:
        raise LegokitError(f"unknown scoring {scoring!r}: use one of {list(SCORINGS)}")
    if not examples:
        raise LegokitError(f"no examples to evaluate for task {task!r}")
    kind = _kind(task, examples)
    base = [{"uid": ex.uid, "task": task, "scoring": scoring} for ex in examples]

    if kind == "choice":
        if scoring == "harness":
            requests = [harness_requests(ex, tokenizer) for ex in examples]
            sums = score_requests(model, requests, bar=bar)
            out = []
            for rec, ex, (_, conts), opts in zip(base, examples, requests, sums, strict=True):
                gold = ex.answer_index
                norm = [v / len(o) for v, o in zip(opts, ex.options, strict=True)]  # lm-eval: characters
                pred = _argmax(opts)
                out.append({**rec, "prediction": pred, "correct": float(pred == gold),
                            "acc_norm": float(_argmax(norm) == gold), "nll": -opts[gold] / len(conts[gold]),
                            "tokens": len(conts[gold]), "margin": _margin(opts, gold), "option_logprobs": opts})
            return out
        # label: the gold response (label + end of turn) gives the NLL, each label its option score
        requests = []
        for ex in examples:
            prompt, response = tokenize_example(ex, tokenizer)
            requests.append((prompt, [response, *choice_ids(ex, tokenizer)]))
        sums = score_requests(model, requests, bar=bar)
        out = []
        for rec, ex, (_, conts), got in zip(base, examples, requests, sums, strict=True):
            opts, gold = got[1:], ex.answer_index
            pred = _argmax(opts)
            out.append({**rec, "prediction": pred, "correct": float(pred == gold), "nll": -got[0] / len(conts[0]),
                        "tokens": len(conts[0]), "margin": _margin(opts, gold), "option_logprobs": opts})
        return out

    tokens = [tokenize_example(ex, tokenizer) for ex in examples]
    sums = score_requests(model, [(p, [r]) for p, r in tokens], bar=bar)
    budget = TASKS[task].max_new_tokens if task in TASKS else 16
    preds = _generate(model, tokenizer, [p for p, _ in tokens], budget, batch_size, bar)
    out = []
    for rec, ex, (_, resp), (nll_sum,), pred in zip(base, examples, tokens, sums, preds, strict=True):
        golds = ex.answers or (ex.response,)
        item = {**rec, "nll": -nll_sum / len(resp), "tokens": len(resp), "margin": None}
        if kind == "summarize":
            item.update(prediction=pred, rouge_l=max(rouge_l(pred, g) for g in golds))
        else:
            pred = pred.strip().split("\n")[0]  # short answers: the first line is the answer
            em = number_match if task == "asdiv" else exact_match
            item.update(prediction=pred, exact_match=em(pred, golds), f1=token_f1(pred, golds))
        item["correct"] = item[TASKS[task].primary if task in TASKS else "exact_match"]
        out.append(item)
    return out


def training_losses(model, tokenizer, examples: Sequence[Example], *, max_len: int, fmt: str = "chat",
                    seed: int = 0, bar=None) -> list[float]:
    """Each example's loss as local training computes it: the mean negative log-likelihood per response token of
    its training tokens (``data.encode``: format ``fmt``, the same truncation at ``max_len``), teacher-forced.

    The membership-inference audit's per-example statistic (``legokit.audit``). Returns one float per example.
    """
    if not examples:
        raise LegokitError("no examples to score: give at least one")
    requests = []
    for ex in examples:
        ids, labels = encode(ex, tokenizer, max_len, fmt)
        k = sum(1 for t in labels if t == -100)  # the prompt's tokens carry no label
        requests.append((ids[:k], [ids[k:]]))
    with _eval_mode(model, seed):
        sums = score_requests(model, requests, bar=bar)
    return [-got[0] / len(req[1][0]) for got, req in zip(sums, requests, strict=True)]


def summarize(task: str, records: Sequence[dict]) -> dict[str, float]:
    """A task's metrics from its per-item records: the mean of each per-item metric over the items."""
    if not records:
        raise LegokitError(f"no records to summarize for task {task!r}")
    names = ["accuracy", "acc_norm", "nll"] if "option_logprobs" in records[0] else \
        [m for m in ("exact_match", "f1", "rouge_l", "nll") if m in records[0]]
    out = {}
    for name in names:
        key = "correct" if name == "accuracy" else name
        if key not in records[0]:
            continue
        vals = [float(r[key]) for r in records]
        bad = [r["uid"] for r, v in zip(records, vals, strict=True) if not math.isfinite(v)]
        if bad:
            raise LegokitError(f"task {task!r}: {name} is not finite for item(s) {bad[:3]}; the model produced "
                               "NaN/inf log-probabilities (check the weights, e.g. a diverged LoRA update)")
        out[name] = sum(vals) / len(vals)
    return out


def evaluate_examples(model, tokenizer, task: str, examples: Sequence[Example], batch_size: int = 8,
                      bar=None, scoring: str = "label") -> dict[str, float]:
    """Metrics of one task on given examples (``summarize`` over ``score_items``)."""
    return summarize(task, score_items(model, tokenizer, task, examples, scoring=scoring, batch_size=batch_size,
                                       bar=bar))


def select_items(examples: Sequence[Example], n: int | None, draw_seed: int | None = None) -> list[Example]:
    """The test items to score: the first ``n`` (``draw_seed=None``; the splits are pre-shuffled) or a seeded
    random sample of ``n`` (a different draw per seed, the same draw for every model of one seed)."""
    examples = list(examples)
    if n is None or n >= len(examples):
        return examples
    if draw_seed is None:
        return examples[:n]
    task = examples[0].task if examples else ""
    picked = sorted(random.Random(f"legokit-eval-{task}-{draw_seed}").sample(range(len(examples)), n))
    return [examples[i] for i in picked]


def score_tasks(
    model,
    tokenizer,
    tasks: str | Sequence[str] | Mapping[str, Sequence[Example]],
    split: str = "test",
    n: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    scoring: str = "label",
    draw_seed: int | None = None,
) -> dict[str, list[dict]]:
    """Per-item records (``score_items``) of a model on tasks: ``{task: [record, ...]}``.

    Args:
        tasks: task names (loaded with ``load_task(name, split)``) or ``{task: examples}``.
        split: which prepared split to read for named tasks.
        n: score ``n`` examples of each task (``select_items``): the first ``n``, or a sample drawn with
            ``draw_seed``.
        batch_size: sequences per generate call.
        seed: seeds a private torch RNG for the duration (greedy scoring uses none; kept for safety).
        scoring: ``"label"`` or ``"harness"`` (``SCORINGS``).
    """
    if n is not None and n < 1:
        raise LegokitError(f"n={n}; use a positive number of examples per task, or None for all")
    if batch_size < 1:
        raise LegokitError(f"batch_size={batch_size}; use at least 1")
    if scoring not in SCORINGS:
        raise LegokitError(f"unknown scoring {scoring!r}: use one of {list(SCORINGS)}")
    if isinstance(tasks, str):
        tasks = [tasks]
    data = dict(tasks) if isinstance(tasks, Mapping) else {t: load_task(t, split) for t in tasks}
    data = {t: select_items(exs, n, draw_seed) for t, exs in data.items()}
    total = sum(len(exs) * (1 if _kind(t, exs) == "choice" else 2) for t, exs in data.items())
    out: dict[str, list[dict]] = {}
    with _eval_mode(model, seed), progress_bar(total=total, desc="evaluate", leave=False) as bar:
        for task, exs in data.items():
            bar.set_postfix_str(task)
            out[task] = score_items(model, tokenizer, task, exs, scoring=scoring, batch_size=batch_size, bar=bar)
    return out


def evaluate_tasks(model, tokenizer, tasks: str | Sequence[str] | Mapping[str, Sequence[Example]], *args,
                   **kwargs) -> dict[str, dict[str, float]]:
    """Score a model on tasks: ``score_tasks`` (same arguments: split, n, batch_size, seed, scoring, draw_seed),
    then ``summarize`` per task.

    Returns:
        ``{task: {metric: value}}``; metrics are ``accuracy`` (choice; ``acc`` under harness scoring, which adds
        ``acc_norm``), ``exact_match`` and ``f1`` (nq_open, asdiv), ``rouge_l`` (xsum), all in [0, 1], and
        ``nll`` for every task (the item mean of each item's per-token NLL).
    """
    records = score_tasks(model, tokenizer, tasks, *args, **kwargs)
    return {task: summarize(task, recs) for task, recs in records.items()}


# ---------------------------------------------------------------- a model scored as an experiment scores it

# The task name of held-out-text windows in per-item files (``score_model``).
HELDOUT = "heldout_text"


def primary_metric(task: str) -> str:
    """The headline metric of a task (the one averaged into ``mean_score``)."""
    return TASKS[task].primary


def score_model(model, tokenizer, cfg: ExperimentConfig, progress: bool = True, *, n: int | None = None,
                items_file: str | Path | None = None) -> dict:
    """Task scores, their mean over primary metrics, and held-out corpus perplexity.

    Args:
        n: test items per task (default ``cfg.eval.n``); drawn per seed when ``cfg.eval.items == "per_seed"``.
        items_file: where to write the per-item records (``write_items``: one per test item, ``task`` and ``uid``
            included), so two models can be compared item by item; its name is recorded under ``items``.
    Returns:
        ``{"tasks": {task: metrics}, "primary": {task: value}, "mean_score", "perplexity", "scoring", "n",
        "items"}``.
    """
    tasks = cfg.eval.tasks or list(TASKS)
    n = cfg.eval.n if n is None else n
    draw = cfg.seed if cfg.eval.items == "per_seed" else None
    records = score_tasks(model, tokenizer, tasks, split="test", n=n, batch_size=cfg.eval.batch_size,
                          seed=cfg.seed, scoring=cfg.eval.scoring, draw_seed=draw)
    scores = {t: summarize(t, recs) for t, recs in records.items()}
    windows = window_nlls(model, tokenizer, eval_texts(cfg.eval.ppl_texts, seed=cfg.seed), seq_len=cfg.eval.seq_len,
                          batch_size=cfg.eval.batch_size)
    # held-out text as items too: a window's mean NLL (C3 compares perplexities window by window)
    records[HELDOUT] = [{"uid": f"window-{i:03d}", "task": HELDOUT, "nll": s / k, "tokens": k}
                        for i, (s, k) in enumerate(windows)]
    primary = {t: scores[t][primary_metric(t)] for t in tasks}
    out = {"tasks": scores, "primary": primary, "mean_score": float(np.mean(list(primary.values()))),
           "perplexity": windows_perplexity(windows), "scoring": cfg.eval.scoring, "n": n}
    if items_file is not None:
        write_items(items_file, [r for recs in records.values() for r in recs])
        out["items"] = Path(items_file).name
    return out


def write_items(path: str | Path, records: Sequence[dict]) -> None:
    """Per-item records as JSON lines (one record a line), written atomically."""
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in records))


def read_items(path: str | Path) -> list[dict]:
    """The per-item records ``write_items`` wrote.

    Raises:
        LegokitError: there is no such file (a run scored before legokit kept per-item records).
    """
    path = Path(path)
    if not path.is_file():
        raise LegokitError(f"{path} is missing: this run was scored without per-item records (legokit before "
                           "per-item evaluation); rerun the condition to get intervals")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
