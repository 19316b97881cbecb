"""Client datasets: ``partition`` deals examples to clients; ``balance_labels`` / ``label_imbalance`` check and
even out how often each gold answer occurs in a training set."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from legokit.data.tasks import Example
from legokit.names import LABEL_IMBALANCE, PARTITIONS
from legokit.utils import LegokitError


def split_counts(n: int, props: np.ndarray) -> np.ndarray:
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
            for c, size in enumerate(split_counts(len(idx), weights)):
                owners[c].extend(idx[start: start + size].tolist())
                start += size
    else:
        idx = rng.permutation(len(examples))
        if scheme == "iid":
            for c in range(num_clients):
                owners[c] = idx[c::num_clients].tolist()
        else:
            sizes = split_counts(len(idx), rng.dirichlet([alpha or 1.0] * num_clients))
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
