"""Did training learn? Paired before/after gains, the majority-answer baseline, and the learning gate.

A gain is ``after - before`` on the same items, in points (x100 of each item's primary score), with a paired
bootstrap interval (``stats.paired_difference``). On choice tasks a gain a constant answer would also give is not
learning, so every row also carries the items' **majority-answer baseline** (what always answering the most common
gold answer scores) and the **top share** (how often the model gave its most common answer).

The gate's rule, fixed before any result was looked at (issue 21): the run learned iff the densest client's
own-task gain has a 95% interval above 0 **and**, where its tasks are choice tasks, its after-training score is
above the majority-answer baseline of the same items by an interval above 0 (``beats_majority``). Sparser clients
and the global LLM are reported, not gated: a pruned block may learn less, and the global LLM is what the claims
then judge.

``tune`` measures a task's learnability the same way on the **validation** split (never test items): one dense
client of the LLM per learning rate, from the same initialisation and on the same batches.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from legokit.config import LoraConfig, TrainConfig
from legokit.data import TASKS, balance_labels, load_task
from legokit.evaluate import score_tasks, select_items
from legokit.lora import attach_lora, detach_lora
from legokit.models import load_model
from legokit.names import DEFAULT_MODEL
from legokit.stats import paired_difference
from legokit.train import train_client
from legokit.utils import LegokitError, seed_everything

LEVEL = 0.95


def _cells(records: Sequence[Mapping[str, Any]], value=lambda r: 100.0 * r["correct"]) -> dict:
    cells: dict = {}
    for r in records:
        cells.setdefault((r.get("seed", 0), r["task"]), {})[r["uid"]] = float(value(r))
    return cells


def majority_baseline(records: Sequence[Mapping[str, Any]], examples: Sequence) -> dict | None:
    """What always giving the most common gold answer scores on these choice items: ``{share, answer}`` (points),
    or None when the items are not choice items. ``examples`` are the scored ``data.Example`` s (by uid)."""
    by_uid = {ex.uid: ex for ex in examples}
    golds = [by_uid[r["uid"]] for r in records if r["uid"] in by_uid and by_uid[r["uid"]].choices]
    if not golds or len(golds) != len(records):
        return None
    counts = collections.Counter(ex.choices[ex.answer_index] for ex in golds)
    answer, n = max(sorted(counts.items()), key=lambda kv: kv[1])
    return {"share": 100.0 * n / len(golds), "answer": answer}


def top_share(records: Sequence[Mapping[str, Any]], examples: Sequence) -> dict | None:
    """How often the model gave its most common answer on choice items: ``{share, answer}`` (points), or None."""
    by_uid = {ex.uid: ex for ex in examples}
    if not records or any(not (by_uid.get(r["uid"]) and by_uid[r["uid"]].choices) for r in records):
        return None
    counts = collections.Counter(by_uid[r["uid"]].choices[int(r["prediction"])] for r in records)
    answer, n = max(sorted(counts.items()), key=lambda kv: kv[1])
    return {"share": 100.0 * n / len(records), "answer": answer}


def gain(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], examples: Sequence = (), *,
         seed: int = 0) -> dict:
    """``after - before`` on the same items (tasks weighted equally), in points, with its 95% paired interval.

    Returns:
        ``{metric: "points", before, after, gain, ci: [lo, hi], items, majority, top_share_before,
        top_share_after, beats_majority}``; the last four only for choice items (``examples`` given), where
        ``majority`` is ``{share, answer}`` of the items' gold answers and ``beats_majority`` the interval of
        ``after`` minus a constant majority answer, item by item.
    """
    if not before or not after:
        raise LegokitError("a gain needs records before and after training; got none")
    x, y = _cells(after), _cells(before)
    diff = paired_difference(x, y, seed=seed, level=LEVEL)
    mean = lambda cells: float(np.mean([np.mean(list(v.values())) for v in cells.values()]))  # noqa: E731
    out = {"metric": "points", "before": mean(y), "after": mean(x), "gain": diff.estimate,
           "ci": [diff.low, diff.high], "items": diff.n_items}
    if all("nll" in r for r in (*before, *after)):  # the gold answer's NLL per token: moves before points do
        nx, ny = _cells(after, lambda r: r["nll"]), _cells(before, lambda r: r["nll"])
        nd = paired_difference(nx, ny, seed=seed, level=LEVEL)
        out["nll"] = {"before": mean(ny), "after": mean(nx), "change": nd.estimate, "ci": [nd.low, nd.high]}
    if examples and majority_baseline(after, examples) is not None:  # choice items only
        by_uid = {ex.uid: ex for ex in examples}
        per_task: dict[str, list] = {}
        for r in after:
            per_task.setdefault(r["task"], []).append(r)
        per = {t: majority_baseline(recs, examples) for t, recs in per_task.items()}  # a constant answer per task
        const = {r["uid"]: 100.0 * (by_uid[r["uid"]].choices[by_uid[r["uid"]].answer_index] == per[r["task"]]["answer"])
                 for r in after}
        beat = paired_difference(x, _cells(after, lambda r: const[r["uid"]]), seed=seed, level=LEVEL)
        majority = {"share": float(np.mean([m["share"] for m in per.values()])),  # tasks weigh equally, as in gain
                    "answer": "/".join(m["answer"] for m in per.values()),
                    "per_task": {t: m["share"] for t, m in per.items()}}
        out.update(majority=majority, top_share_before=top_share(before, examples),
                   top_share_after=top_share(after, examples),
                   beats_majority={"margin": beat.estimate, "ci": [beat.low, beat.high]})
    return out


def learned(row: Mapping[str, Any]) -> bool:
    """The gate's test of one gain row: interval above 0, and above the majority answer where there is one."""
    ok = row["ci"][0] > 0
    if row.get("beats_majority") is not None:
        ok = ok and row["beats_majority"]["ci"][0] > 0
    return ok


def gate(clients: Sequence[Mapping[str, Any]]) -> dict:
    """The verdict over the per-client rows (each with ``sparsity`` and a gain): the densest client decides.

    Returns:
        ``{"gate": "passed" | "failed", "judged_client", "reason"}``.
    """
    rows = [c for c in clients if c.get("gain") is not None]
    if not rows:
        return {"gate": "failed", "judged_client": None, "reason": "no client has a before/after score"}
    densest = min(c["sparsity"] for c in rows)
    judged = [c for c in rows if c["sparsity"] == densest]
    ok = all(learned(c) for c in judged)
    names = ", ".join(str(c["client"]) for c in judged)
    if ok:
        reason = (f"client {names} (sparsity {densest:g}) gained "
                  + "; ".join(f"{c['gain']:+.1f} [{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}]" for c in judged)
                  + " points on its own tasks, above 0" + (" and above the majority answer"
                                                           if any(c.get("beats_majority") for c in judged) else ""))
    else:
        why = []
        for c in judged:
            if c["ci"][0] <= 0:
                why.append(f"client {c['client']}: gain {c['gain']:+.1f} [{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}] "
                           "does not exclude 0")
            bm = c.get("beats_majority")
            if bm is not None and bm["ci"][0] <= 0:
                why.append(f"client {c['client']}: after-training score minus the majority answer "
                           f"{bm['margin']:+.1f} [{bm['ci'][0]:+.1f}, {bm['ci'][1]:+.1f}] does not exclude 0")
        reason = "; ".join(why)
    return {"gate": "passed" if ok else "failed", "judged_client": [c["client"] for c in judged], "reason": reason}


def format_table(learning: Mapping[str, Any]) -> str:
    """The learning object of a run as plain text: one line per client, then the global LLM and the verdict."""
    head = (f"{'model':24s}{'sparsity':>9s}  {'tasks':24s}{'before':>8s}{'after':>8s}{'gain [95% CI]':>24s}"
            f"{'majority':>10s}{'top answer':>12s}   {'NLL before -> after, change [95% CI]'}")
    how = ", ".join(f"{k} {learning[k]}" for k in ("scoring", "format") if learning.get(k))
    lines = [f"learning (points; each block on its own tasks, paired over the same {learning.get('items', '')} test "
             f"items per task{'; ' + how if how else ''})",
             head, "-" * len(head)]

    def row(label: str, r: Mapping[str, Any]) -> str:
        maj = r.get("majority")
        top = r.get("top_share_after")
        return (f"{label[:24]:24s}{'' if r.get('sparsity') is None else format(r['sparsity'], 'g'):>9s}  "
                f"{','.join(r.get('tasks', []))[:24]:24s}{r['before']:8.1f}{r['after']:8.1f}"
                f"{r['gain']:+10.1f} [{r['ci'][0]:+5.1f}, {r['ci'][1]:+5.1f}]"
                f"{'' if maj is None else format(maj['share'], '.0f') + '%':>10s}"
                f"{'' if top is None else format(top['share'], '.0f') + '% ' + str(top['answer']):>12s}"
                + ("" if not r.get("nll") else f"   {r['nll']['before']:.3f} -> {r['nll']['after']:.3f}, "
                   f"{r['nll']['change']:+.3f} [{r['nll']['ci'][0]:+.3f}, {r['nll']['ci'][1]:+.3f}]"))

    for c in learning.get("clients", []):
        if c.get("gain") is not None:
            lines.append(row(f"client {c['client']} (block)", c))
    if learning.get("global"):
        lines.append(row("global LLM - base", learning["global"]))
    verdict = learning.get("gate", "?")
    lines.append(f"learning gate: {verdict.upper()}" + (f" ({learning['reason']})" if learning.get("reason") else ""))
    return "\n".join(lines)


# ----- learnability on the validation split ------------------------------------------------------------------
def tune(tasks: Sequence[str], *, lrs: Sequence[float] = (5e-4,), steps: Sequence[int] = (48,), n: int = 200,
         split: str = "validation", model: str | None = None, rank: int = 8, alpha: float = 16.0,
         batch_size: int = 4, max_len: int = 256, fmt: str = "cloze", balance: bool = False, seed: int = 0,
         device: str = "auto", log=print) -> list[dict]:
    """Each task's own-task gain of one dense client after ``steps`` local steps at each lr, on validation items.

    For every task: the first ``n`` validation items are scored before training; then, per lr, LoRA (rank, alpha,
    on every projection, no mask) is attached afresh with the same seed, trained on the task's train split in
    format ``fmt`` for ``max(steps)`` steps (the same batches for every lr), scored after each step count of
    ``steps``, and detached. Rows are ``gain`` rows plus ``task, lr, steps, final_loss, train_seconds``.

    Raises:
        LegokitError: ``split`` is not ``validation`` (tuning on test items would choose hyperparameters on the
            items the claims are judged on), or an unknown task.
    """
    if split != "validation":
        raise LegokitError(f"tuning on the {split!r} split is refused: hyperparameters and tasks are chosen on the "
                           "validation split only, so the test items the claims are judged on stay unseen; "
                           "use split='validation' (--split validation)")
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise LegokitError(f"unknown tasks {bad or 'none'}: use names from {list(TASKS)}")
    steps = sorted(set(int(s) for s in steps))
    if steps[0] < 1:
        raise LegokitError(f"steps {steps}: every step count must be >= 1")
    seed_everything(seed)
    llm, tok = load_model(model or DEFAULT_MODEL, device=device)
    rows = []
    for task in tasks:
        train = load_task(task, "train")
        if balance:
            train = balance_labels(train, seed)
        items = select_items(load_task(task, "validation"), n)
        before = score_tasks(llm, tok, {task: items}, scoring="harness", seed=seed)[task]
        for lr in lrs:
            seed_everything(seed)
            attach_lora(llm, LoraConfig(rank=rank, alpha=alpha), seed=seed)
            try:
                done, loss, secs = 0, float("nan"), 0.0
                for k in steps:  # continue training to each step count: one run per lr
                    cfg = TrainConfig(local_steps=k - done, batch_size=batch_size, lr=lr, max_len=max_len,
                                      format=fmt)
                    res = train_client(llm, tok, train, cfg, seed=seed + done, client=f"{task}/lr={lr:g}",
                                       progress=False)
                    done, loss, secs = k, res.final_loss, secs + res.seconds
                    after = score_tasks(llm, tok, {task: items}, scoring="harness", seed=seed)[task]
                    row = {"task": task, "lr": lr, "steps": k, "final_loss": loss, "train_seconds": round(secs, 1),
                           "train_examples": len(train), **gain(before, after, items, seed=seed)}
                    rows.append(row)
                    maj = row.get("majority")
                    log(f"{task:16s} lr={lr:<8g} steps={k:<4d} {row['before']:5.1f} -> {row['after']:5.1f} "
                        f"gain {row['gain']:+5.1f} [{row['ci'][0]:+5.1f}, {row['ci'][1]:+5.1f}]"
                        + ("" if maj is None else f"  majority {maj['share']:.0f}%, top answer "
                           f"{row['top_share_after']['share']:.0f}%") + f"  loss {loss:.3f}")
            finally:
                detach_lora(llm)  # no merge: the LLM is untouched for the next run
    return rows


def tune_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table of ``tune`` rows."""
    head = ("| task | lr | steps | before | after | gain [95% CI] | after − majority [95% CI] | top answer after "
            "| majority |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        bm, top, maj = r.get("beats_majority"), r.get("top_share_after"), r.get("majority")
        lines.append(f"| {r['task']} | {r['lr']:g} | {r['steps']} | {r['before']:.1f} | {r['after']:.1f} "
                     f"| {r['gain']:+.1f} [{r['ci'][0]:+.1f}, {r['ci'][1]:+.1f}] "
                     + ("| – " if bm is None else f"| {bm['margin']:+.1f} [{bm['ci'][0]:+.1f}, {bm['ci'][1]:+.1f}] ")
                     + ("| – " if top is None else f"| {top['share']:.0f}% {top['answer']} ")
                     + ("| – |" if maj is None else f"| {maj['share']:.0f}% {maj['answer']} |"))
    return "\n".join(lines)
