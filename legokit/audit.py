"""A membership-inference audit of a finished run: can an attacker tell a client's training examples from unseen
examples of the same tasks by the trained models' losses?

* **Members**: per client, the training examples its local steps actually reached: ``train.batch_order`` drawn
  again with the client's seed (``messages.client_seed``) for every round ``metrics.jsonl`` records it trained in.
  Examples of its partition the steps never reached are not members (a client with more examples than
  ``local_steps x batch_size`` sees only some of them).
* **Non-members**: examples of the same tasks from the rest of each task's training split, which no client was
  dealt (``experiment.training_split``): the same prepared, shuffled population as the members, and not the test
  split the claims are scored on. Drawn for each client in its members' task proportions, disjoint across clients.
* **Statistic**: each example's loss in its training form (``evaluate.training_losses``).
* **Attacks** (a higher score means "member"): ``loss`` (Yeom et al. 2018), score = ``-loss_target``;
  ``reference`` (a reference model calibrates how hard an example is in itself; here the untrained base LLM),
  score = ``-(loss_target - loss_reference)``.
* **Models**: the global LLM (when the condition has one) and each block with the final update through its mask
  (``local``: each trained client's own adapter on its block); each attacked on every trained client's members
  and, when several clients trained, on all of them pooled.
* **Control**: the untrained base LLM attacked the same way (loss only); it saw no member, so it should read 0.5.
* **Metrics**: ROC AUC (Mann-Whitney, ties counted half) and the TPR at FPR <= ``fpr`` (the largest TPR of an ROC
  point within it; its resolution is one non-member), with percentile bootstrap intervals that resample members
  and non-members independently (``stats.two_sample_interval``).

``audit_run`` returns the audit (rows and per-example losses), ``audit_table`` prints it, ``legokit audit`` writes
``audit.json`` into the run directory; ``viz.audit.plot_roc_curves`` draws the ROC curves.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from legokit.config import ExperimentConfig
from legokit.data import split_counts
from legokit.evaluate import training_losses
from legokit.experiment import client_partitions, training_split
from legokit.federation import block_model, global_model
from legokit.lmeval import read_run, restore_strategy
from legokit.messages import client_seed
from legokit.names import aggregator_pools_clients
from legokit.stats import two_sample_interval
from legokit.train import batch_order
from legokit.utils import LegokitError, atomic_write_json

ATTACKS = ("loss", "reference")
BASE = "base LLM"  # the reference model's key in each example's losses
ALL = "all"  # the pooled members of every trained client


# ----- the metrics -------------------------------------------------------------------------------------------------
def _scores(members, nonmembers) -> tuple[np.ndarray, np.ndarray]:
    m, u = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    if m.ndim != 1 or u.ndim != 1 or not m.size or not u.size:
        raise LegokitError(f"an attack needs members and non-members (got {m.size} and {u.size} scores as 1-D arrays)")
    return m, u


def roc_auc(members, nonmembers) -> float:
    """The ROC AUC of membership scores: P(member's score > non-member's), a tie counting half (Mann-Whitney U)."""
    m, u = _scores(members, nonmembers)
    u = np.sort(u)
    below = np.searchsorted(u, m, side="left")  # non-members strictly under each member
    ties = np.searchsorted(u, m, side="right") - below
    return float((below + 0.5 * ties).sum() / (m.size * u.size))


def roc_curve(members, nonmembers) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of "member iff score >= t" for every score t, highest first, from (0, 0) to (1, 1)."""
    m, u = _scores(members, nonmembers)
    t = np.unique(np.concatenate([m, u]))[::-1]  # thresholds, descending
    tpr = (m[None, :] >= t[:, None]).mean(axis=1)  # (thresholds,)
    fpr = (u[None, :] >= t[:, None]).mean(axis=1)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def tpr_at_fpr(members, nonmembers, fpr: float = 0.01) -> float:
    """The largest TPR of an ROC point whose FPR is at most ``fpr``: the members scored above the
    ``floor(fpr * n) + 1``-th highest non-member."""
    m, u = _scores(members, nonmembers)
    k = int(np.floor(fpr * u.size + 1e-9))  # false positives allowed
    if k >= u.size:
        return 1.0
    cut = np.sort(u)[::-1][k]  # a threshold must lie above it
    return float((m > cut).mean())


def attack_scores(attack: str, target, reference=None) -> np.ndarray:
    """Membership scores (higher: member) from per-example losses: ``loss`` -target, ``reference``
    -(target - reference)."""
    target = np.asarray(target, dtype=np.float64)
    if attack == "loss":
        return -target
    if attack == "reference":
        if reference is None:
            raise LegokitError("the reference attack needs the reference model's losses")
        return np.asarray(reference, dtype=np.float64) - target
    raise LegokitError(f"unknown attack {attack!r}: use one of {list(ATTACKS)}")


# ----- who is a member ---------------------------------------------------------------------------------------------
def read_metrics(run_dir: str | Path, last_round: int) -> list[dict]:
    """The client lines of ``metrics.jsonl`` up to ``last_round``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LegokitError(f"{path} is missing: the audit reads which clients trained in which round from it; "
                           "the run directory is incomplete")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [m for m in lines if m.get("round", 0) <= last_round]


def trained_indices(cfg: ExperimentConfig, metrics: Sequence[dict], client: int, n_examples: int) -> list[int]:
    """Indices into ``client``'s examples that its local steps reached, over the rounds it trained in
    (``metrics`` lines without an error), as ``train.train_client`` drew them."""
    steps_default = cfg.train.local_steps * (cfg.fed.num_clients if aggregator_pools_clients(cfg.fed.aggregator)
                                             else 1)
    reached: set[int] = set()
    for m in metrics:
        if m.get("client") != client or m.get("error") or m.get("status", "ok") != "ok":
            continue
        order = batch_order(n_examples, int(m.get("steps") or steps_default), cfg.train.batch_size,
                            client_seed(cfg.seed, m["round"], client))
        reached.update(i for batch in order for i in batch)
    return sorted(reached)


def audit_sets(cfg: ExperimentConfig, metrics: Sequence[dict], *, n: int | None = None, nonmembers: int = 200,
               partitions: Sequence[list] | None = None, unseen: dict[str, list] | None = None) -> list[dict]:
    """The members and non-members of each client that trained: ``[{client, rounds, available, members,
    nonmembers}]`` (examples).

    Args:
        metrics: ``metrics.jsonl``'s lines (``read_metrics``).
        n: members per client, a seeded sample of those reached (None: all of them).
        nonmembers: non-members per client, in its members' task proportions.
        partitions, unseen: the clients' examples and each task's unseen training examples (default: drawn from
            ``cfg`` as the run drew them, ``experiment.client_partitions`` / ``experiment.training_split``).
    Raises:
        LegokitError: no client trained, ``n`` above a client's reached examples, too few unseen examples.
    """
    if n is not None and n < 1:
        raise LegokitError(f"n={n}: audit at least 1 member per client (or all: n=None)")
    if nonmembers < 1:
        raise LegokitError(f"nonmembers={nonmembers}: use at least 1 (100 or more resolve a TPR at 1% FPR)")
    if partitions is None:
        partitions = client_partitions(cfg)
    if unseen is None:
        unseen = {t: training_split(cfg, t)[1] for t in cfg.data.tasks}
    if aggregator_pools_clients(cfg.fed.aggregator):  # one client trained on everyone's data, pooled
        partitions = [[ex for part in partitions for ex in part]]
    out = []
    for k, part in enumerate(partitions):
        idx = trained_indices(cfg, metrics, k, len(part))
        if not idx:
            continue
        reached = len(idx)
        if n is not None and n > reached:
            raise LegokitError(f"n={n} members asked for, but client {k}'s local steps reached only {len(idx)} of its "
                               f"{len(part)} examples: use n <= {len(idx)} (or leave n out: all of them)")
        if n is not None:
            idx = sorted(random.Random(f"legokit-audit-{cfg.seed}-{k}").sample(idx, n))
        rounds = sorted({m["round"] for m in metrics if m.get("client") == k and not m.get("error")})
        out.append({"client": k, "rounds": rounds, "available": reached,
                    "members": [part[i] for i in idx], "nonmembers": []})
    if not out:
        raise LegokitError("no client trained in any finished round (metrics.jsonl: every client line has an error), "
                           "so there are no members to audit: fix the run's failure and run it again")
    _deal_nonmembers(cfg, out, unseen, nonmembers)
    return out


def _deal_nonmembers(cfg: ExperimentConfig, clients: list[dict], unseen: dict[str, list], per_client: int) -> None:
    """Fill each client's ``nonmembers``: ``per_client`` unseen examples in its members' task proportions, each task's
    drawn in one seeded order and dealt out, so no example goes to two clients."""
    wants = []
    for c in clients:
        tasks = sorted({ex.task for ex in c["members"]})
        counts = split_counts(per_client, np.array([sum(ex.task == t for ex in c["members"]) for t in tasks], float))
        wants.append(dict(zip(tasks, counts.tolist(), strict=True)))
    for task in sorted({t for w in wants for t in w}):
        need = sum(w.get(task, 0) for w in wants)
        pool = list(unseen.get(task, []))
        if need > len(pool):
            raise LegokitError(f"{need} non-members of {task!r} asked for, but its training split holds only "
                               f"{len(pool)} examples no client was dealt: lower nonmembers (now {per_client} per "
                               "client)")
        random.Random(f"legokit-audit-{cfg.seed}-{task}").shuffle(pool)
        at = 0
        for c, w in zip(clients, wants, strict=True):
            c["nonmembers"] += pool[at: at + w.get(task, 0)]
            at += w.get(task, 0)


# ----- the audit ---------------------------------------------------------------------------------------------------
def group_scores(audit: dict, model: str, members_of: str, attack: str) -> tuple[np.ndarray, np.ndarray]:
    """The membership scores of ``model`` under ``attack`` for the members of ``members_of`` (a client's label,
    ``"client K"``, or ``"all"``) and their non-members: ``(member_scores, nonmember_scores)``."""
    recs = [r for r in audit["examples"] if members_of == ALL or f"client {r['client']}" == members_of]
    if not recs:
        raise LegokitError(f"no audited examples for {members_of!r}: use 'all' or one of "
                           f"{sorted({'client ' + str(r['client']) for r in audit['examples']})}")
    if model not in recs[0]["loss"]:
        raise LegokitError(f"model {model!r} was not audited: use one of {list(recs[0]['loss'])}")
    scores = attack_scores(attack, [r["loss"][model] for r in recs], [r["loss"][BASE] for r in recs])
    member = np.array([r["member"] for r in recs], dtype=bool)
    return scores[member], scores[~member]


def audit_rows(audit: dict, *, fpr: float = 0.01, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> list[dict]:
    """One row per (model, members of, attack): AUC and TPR at FPR <= ``fpr`` with bootstrap intervals, the mean
    target loss of members and non-members, and the ROC curve (``roc``: ``fpr`` and ``tpr`` lists). The untrained
    base LLM comes first, loss attack only: it saw no member, so anything but chance there means the members and
    non-members differ in themselves."""
    clients = sorted({r["client"] for r in audit["examples"]})
    groups = [f"client {k}" for k in clients] + ([ALL] if len(clients) > 1 else [])
    rows = []
    for model in [BASE, *audit["models"]]:  # the untrained LLM first: a control that should read 0.5
        for group in groups:
            loss_in, loss_out = (-s for s in group_scores(audit, model, group, "loss"))
            for attack in ATTACKS[:1] if model == BASE else ATTACKS:
                m, u = group_scores(audit, model, group, attack)
                auc_lo, auc_hi = two_sample_interval(m, u, roc_auc, n_boot=n_boot, level=level, seed=seed)
                tpr_lo, tpr_hi = two_sample_interval(m, u, lambda a, b: tpr_at_fpr(a, b, fpr), n_boot=n_boot,
                                                     level=level, seed=seed)
                fp, tp = roc_curve(m, u)
                rows.append({"model": model, "members_of": group, "attack": attack, "members": int(m.size),
                             "nonmembers": int(u.size), "auc": roc_auc(m, u), "auc_low": auc_lo, "auc_high": auc_hi,
                             "tpr": tpr_at_fpr(m, u, fpr), "tpr_low": tpr_lo, "tpr_high": tpr_hi,
                             "member_loss": float(loss_in.mean()), "nonmember_loss": float(loss_out.mean()),
                             "roc": {"fpr": fp.tolist(), "tpr": tp.tolist()}})
    return rows


def check_audit_args(run_dir: Path, out: Path, fpr: float, n_boot: int, level: float) -> None:
    """Every argument checked before the model loads: a run directory with a finished round, a writable output."""
    read_run(run_dir)
    if not 0 < fpr < 1:
        raise LegokitError(f"fpr={fpr}: the false-positive rate of the TPR must lie in (0, 1), e.g. 0.01")
    two_sample_interval([0.0], [0.0], lambda a, b: 0.0, n_boot=n_boot, level=level)  # its own checks of both
    parent = out.parent if out.parent.exists() else None
    if parent is None or not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise LegokitError(f"cannot write {out}: the directory is missing or read-only; give another output file "
                           "(--out) or copy the run directory somewhere writable")


def audit_run(run_dir: str | Path, *, n: int | None = None, nonmembers: int = 200, fpr: float = 0.01,
              n_boot: int = 2000, level: float = 0.95, device: str = "auto", dtype: str = "auto",
              out: str | Path | None = None, progress: bool = True) -> dict:
    """Audit a finished run (a ``legokit run`` directory) for membership inference and write ``audit.json``.

    Args:
        run_dir: the run directory (its last finished round is audited).
        n, nonmembers: members and non-members per trained client (``audit_sets``).
        fpr: the false-positive rate the TPR is read at.
        n_boot, level: the bootstrap intervals' resamples and coverage.
        device, dtype: where and in which precision the models are rebuilt.
        out: the JSON file to write (default ``run_dir/audit.json``).
    Returns:
        the audit: ``run``, ``round``, ``fpr``, ``level``, ``n_boot``, ``models``, ``clients`` (per trained client:
        rounds, reached examples, members, non-members; and the clients that never trained), ``rows``
        (``audit_rows``) and ``examples`` (per example: uid, task, client, member, ``loss`` per model and of the
        base LLM).
    """
    run_dir = Path(run_dir)
    out = run_dir / "audit.json" if out is None else Path(out)
    check_audit_args(run_dir, out, fpr, n_boot, level)
    cfg, rnd, _, _ = read_run(run_dir)
    sets = audit_sets(cfg, read_metrics(run_dir, rnd), n=n, nonmembers=nonmembers)
    examples = [(c["client"], ex, member) for c in sets for member in (True, False)
                for ex in c["members" if member else "nonmembers"]]
    seen = {ex.uid for part in (c["members"] for c in sets) for ex in part}
    if seen & {ex.uid for c in sets for ex in c["nonmembers"]}:  # training_split keeps them apart; a guard
        raise LegokitError("a non-member is also a member: the task's training split has repeated uids")
    exs = [ex for _, ex, _ in examples]
    losses: dict[str, list[float]] = {}

    def score(label: str, model, tok) -> None:
        losses[label] = training_losses(model, tok, exs, max_len=cfg.train.max_len, fmt=cfg.train.format,
                                        seed=cfg.seed)
        if progress:
            print(f"audit: {label} scored on {len(exs)} examples", flush=True)

    strategy, llm, tok, rnd = restore_strategy(run_dir, device, dtype, before=lambda m, t: score(BASE, m, t))
    trained = [c["client"] for c in sets]
    if strategy.has_global:
        with global_model(strategy, llm) as model:
            score("global LLM", model, tok)
        for b in sorted({strategy.assignment[k] for k in range(len(strategy.assignment))}):
            holders = [k for k, a in enumerate(strategy.assignment) if a == b]
            with block_model(strategy, b) as model:
                score(f"block {strategy.blocks[b].id} (client{'s' * (len(holders) > 1)} "
                      f"{', '.join(map(str, holders))})", model, tok)
    else:  # local: each client's own adapter on its block
        for k in trained:
            with block_model(strategy, strategy.assignment[k], k) as model:
                score(f"block {strategy.blocks[strategy.assignment[k]].id} (client {k}'s own)", model, tok)
    audit = {"run": str(run_dir), "round": rnd, "aggregator": cfg.fed.aggregator, "fpr": fpr, "level": level,
             "n_boot": n_boot, "models": [m for m in losses if m != BASE],
             "clients": [{"client": c["client"], "rounds": c["rounds"], "reached": c["available"],
                          "members": len(c["members"]), "nonmembers": len(c["nonmembers"])} for c in sets],
             "untrained_clients": [k for k in range(cfg.fed.num_clients) if k not in trained
                                   and not strategy.pools_clients],
             "examples": [{"uid": ex.uid, "task": ex.task, "client": k, "member": member,
                           "loss": {m: v[i] for m, v in losses.items()}}
                          for i, (k, ex, member) in enumerate(examples)]}
    audit["rows"] = audit_rows(audit, fpr=fpr, n_boot=n_boot, level=level, seed=cfg.seed)
    atomic_write_json(out, audit)
    return audit


def audit_table(audit: dict) -> str:
    """The audit's rows as plain text, with what members and non-members are and the TPR's resolution."""
    pct = f"{100 * audit['fpr']:g}%"
    ci = f"AUC [{round(100 * audit['level'])}% CI]"
    head = (f"{'model':40s}{'members of':>11s}{'in/out':>9s}  {'attack':10s}{ci:>22s}{'TPR@' + pct + 'FPR [CI]':>24s}"
            f"{'loss in/out':>14s}")
    lines = [f"membership-inference audit of {audit['run']} (round {audit['round']}, {audit['aggregator']}): members = "
             "the training examples the clients' local steps reached; non-members = examples of the same tasks' "
             f"training split no client was dealt; percentile bootstrap over {audit['n_boot']} resamples; "
             "AUC 0.5 = no leak", head, "-" * len(head)]
    last = None
    for r in audit["rows"]:
        key = (r["model"], r["members_of"])
        label = (r["model"][:39], r["members_of"], f"{r['members']}/{r['nonmembers']}") if key != last else ("", "", "")
        last = key
        lines.append(f"{label[0]:40s}{label[1]:>11s}{label[2]:>9s}  {r['attack']:10s}"
                     f"{r['auc']:9.3f} [{r['auc_low']:.3f}, {r['auc_high']:.3f}]"
                     f"{r['tpr']:10.3f} [{r['tpr_low']:.3f}, {r['tpr_high']:.3f}]"
                     f"{r['member_loss']:7.3f}/{r['nonmember_loss']:.3f}")
    least = min(r["nonmembers"] for r in audit["rows"])
    allowed = int(np.floor(audit["fpr"] * least + 1e-9))
    lines.append(f"TPR at FPR <= {pct}: at most {allowed} of {least} non-members above the threshold (the fewest of a "
                 f"row)" + ("; that is no false positive at all" if allowed == 0 else "")
                 + f"; chance is a TPR of {pct}")
    if audit["untrained_clients"]:
        lines.append(f"not audited: client(s) {', '.join(map(str, audit['untrained_clients']))} never trained in a "
                     "finished round (every one of their metrics.jsonl lines has an error)")
    return "\n".join(lines)
