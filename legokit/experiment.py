"""The whole LEGO pipeline behind ``legokit run`` and the experiment notebook.

config -> LLM -> building blocks -> client data -> rounds (``federation``) -> evaluation -> run directory.

The conditions it runs are named once, in ``names.CONDITIONS`` (also importable from here as ``CONDITIONS``, as
notebook 04 does); a model is scored by ``evaluate.score_model``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from legokit.blocks import Block, extract_blocks
from legokit.checkpoint import Checkpoint, blocks_made_with, check_blocks
from legokit.config import ExperimentConfig, first_difference
from legokit.data import balance_labels, calibration_texts, label_imbalance, load_task, partition
from legokit.evaluate import (
    read_items,
    score_model,
    score_tasks,
    select_items,
    write_items,
)
from legokit.evidence import detectable_effect
from legokit.federation import block_model, global_model, run_federation
from legokit.learning import format_table, gain, gate
from legokit.models import load_model, param_bytes
from legokit.names import CONDITIONS, THRESHOLDS, aggregator_has_global, aggregator_pools_clients
from legokit.privacy.accountant import privacy_plan
from legokit.privacy.exposure import exposure
from legokit.privacy.mechanism import privacy_lines, privacy_summary
from legokit.strategy import assign_blocks, build_strategy
from legokit.utils import LegokitError, atomic_write_json, heap_mode, peak_rss_mb, seed_everything


def condition_config(cfg: ExperimentConfig, condition: str) -> ExperimentConfig:
    """``cfg`` with the overrides of one experiment condition (``names.CONDITIONS``) applied."""
    if condition not in CONDITIONS:
        raise LegokitError(f"unknown condition {condition!r}: use one of {list(CONDITIONS)}")
    over = dict(CONDITIONS[condition])
    if over.pop("dense_clients", False):
        over["fed.client_sparsities"] = [0.0] * cfg.fed.num_clients
        over["fed.devices"] = None
    return cfg.with_overrides(over) if over else cfg


def client_partitions(cfg: ExperimentConfig) -> list[list]:
    """Draw ``data.train_examples`` training examples over the tasks and split them between clients."""
    pool = [ex for task in cfg.data.tasks for ex in training_split(cfg, task)[0]]
    return partition(pool, cfg.fed.num_clients, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.seed,
                     tasks_per_client=cfg.data.tasks_per_client)


def training_split(cfg: ExperimentConfig, task: str) -> tuple[list, list]:
    """``(drawn, unseen)``: the examples of ``task``'s training split the clients are dealt (the first
    ``data.train_examples // len(data.tasks)``, label-balanced first when ``data.balance_labels``), and the rest
    of that split, which no client sees (the membership-inference audit's non-members)."""
    per_task = max(1, cfg.data.train_examples // len(cfg.data.tasks))
    examples = load_task(task, "train")
    if cfg.data.balance_labels:
        examples = balance_labels(examples, seed=cfg.seed)
    note = label_imbalance(examples, f"{task}'s training split")  # the population the clients draw from
    if note:
        warnings.warn(note, stacklevel=2)
    if len(examples) < per_task:
        raise LegokitError(f"task {task!r} has {len(examples)} training examples"
                           + " after balancing its labels" * cfg.data.balance_labels
                           + f", fewer than the {per_task} asked for: lower data.train_examples")
    return examples[:per_task], examples[per_task:]


def load_or_extract_blocks(cfg: ExperimentConfig, llm, tokenizer, run_dir: Path, progress: bool = True) -> list:
    """The building blocks of this run: loaded from ``run_dir/blocks`` when present, else extracted.

    Raises:
        LegokitError: ``run_dir/blocks`` holds blocks of another config, or a damaged one
            (``checkpoint.check_blocks``).
    """
    bdir = run_dir / "blocks"
    index = bdir / "index.json"
    if check_blocks(bdir, cfg):
        ids = json.loads(index.read_text())["blocks"]
        return [Block.load(bdir / f"{i}", llm) for i in range(len(ids))]
    p = cfg.prune
    blocks = extract_blocks(llm, tokenizer, sparsities=tuple(p.sparsities), method=p.method, pattern=p.pattern,
                            calibration=p.calibration, n_calib=p.n_calib, seq_len=p.seq_len, seed=cfg.seed,
                            texts=calibration_texts(p.n_calib, seed=cfg.seed), progress=progress)
    for i, b in enumerate(blocks):
        b.save(bdir / f"{i}")
    # last, and with what the blocks were made with: a later run reuses them only for the same settings
    atomic_write_json(index, {"blocks": [b.id for b in blocks], "made_with": blocks_made_with(cfg)})
    return blocks


def run_condition(cfg: ExperimentConfig, condition: str, out_dir: str | Path, *, resume: bool = False,
                  progress: bool = True) -> dict:
    """Run one condition of the LEGO experiment (``CONDITIONS``) into ``out_dir``; return its results."""
    if condition == "base":
        return run_experiment(cfg, out_dir, resume=resume, progress=progress, train=False)
    results = run_experiment(condition_config(cfg, condition), out_dir, resume=resume, progress=progress)
    results["condition"] = condition
    atomic_write_json(Path(out_dir) / "results.json", results)
    return results


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
                   inject_failures: dict | None = None, train: bool = True, resume_round: int | None = None) -> dict:
    """Run one LEGO experiment end to end and write ``results.json``; return the results.

    The run directory is opened first, before the model loads (``checkpoint.Checkpoint``): it is bound to
    ``cfg``, a directory holding another run is refused with nothing rewritten, and a resume checks every
    file it will read. ``train=False`` is the zero-shot reference: the LLM and every client's block scored
    untrained. ``resume_round``: resume from that finished round instead of the last one.

    A round in which no client trained leaves the global state as it was: ``results["failure"]`` then says
    so (the caller decides; ``legokit run`` exits non-zero), and ``results_table`` prints it.
    """
    out = Path(out_dir)
    timings: dict[str, float] = {}
    t_all = t = time.time()
    checkpoint = Checkpoint(out, cfg, resume, resume_round=resume_round)
    resume = resume or resume_round is not None
    seed_everything(cfg.seed)
    torch.use_deterministic_algorithms(False)
    llm, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    llm_mb = param_bytes(llm) / 2**20
    timings["load"] = time.time() - t
    partitions = client_partitions(cfg)  # fail fast on data problems, before any heavy work
    t = time.time()
    blocks = load_or_extract_blocks(cfg, llm, tok, out, progress)
    timings["extract"] = time.time() - t

    results: dict = {"name": cfg.name, "model": cfg.model, "aggregator": cfg.fed.aggregator,
                     "broadcast": cfg.fed.broadcast, "seed": cfg.seed, "train_format": cfg.train.format}
    base_file = out / "base_scores.json"
    if cfg.eval.base:
        t = time.time()
        saved = _saved_scores(base_file, cfg) if resume else None
        if saved is not None:
            results["base"] = saved
        else:
            results["base"] = score_model(llm, tok, cfg, progress, items_file=out / "items" / "base.jsonl")
            atomic_write_json(base_file, results["base"])
        timings["eval_base"] = time.time() - t

    learn = train and cfg.eval.learning and not aggregator_pools_clients(cfg.fed.aggregator)
    if learn:
        t = time.time()
        before = learning_before(cfg, tok, blocks, partitions, out)
        timings["eval_learning"] = time.time() - t

    t = time.time()
    if train:
        fed = run_federation(cfg, llm, tok, blocks, partitions, out, resume=resume, progress=progress,
                             inject_failures=inject_failures, checkpoint=checkpoint)
        strategy, rounds = fed.strategy, fed.rounds
    else:  # no round: the initial global state has B = 0, so every model is the untrained one
        strategy, rounds = build_strategy(cfg, llm, blocks, progress=progress), []
        results["condition"] = "base"
    timings["federation"] = time.time() - t
    results.update(_round_failures(rounds, checkpoint.metrics))

    t = time.time()
    if not train and "base" in results:
        results["global"] = results["base"]
    elif strategy.has_global:
        with global_model(strategy, llm) as model:
            results["global"] = score_model(model, tok, cfg, progress, items_file=out / "items" / "global.jsonl")
    clients = []
    for k in range(cfg.fed.num_clients):
        tasks = sorted({ex.task for ex in partitions[k]})
        clients.append({"client": k, "block": blocks[strategy.assignment[k]].id,
                        "sparsity": blocks[strategy.assignment[k]].sparsity, "num_examples": len(partitions[k]),
                        "tasks": tasks})
    results["clients"] = clients
    if strategy.has_global and not strategy.pools_clients:  # what HeteAgg's owner means expose of this block mix
        results["exposure"] = exposure([strategy.block_of(k).masks for k in range(cfg.fed.num_clients)],
                                       [f"client-{k}" for k in range(cfg.fed.num_clients)], strategy.modules)
        plan = privacy_plan(cfg)
        if plan is not None:
            results["privacy"] = privacy_summary(plan, results["exposure"])
    if cfg.eval.blocks and not strategy.pools_clients:
        scored = {}
        for k in range(cfg.fed.num_clients):
            # Federated modes give every holder of a block the same model; `local` keeps one per client.
            key = strategy.assignment[k] if strategy.has_global else k
            if key not in scored:
                client = None if strategy.has_global else k
                label = f"block-{blocks[strategy.assignment[k]].id}" + ("" if client is None else f"-client{k}")
                with block_model(strategy, strategy.assignment[k], client) as model:
                    scored[key] = score_model(model, tok, cfg, progress, n=cfg.eval.n_blocks,
                                              items_file=out / "items" / f"{label}.jsonl")
            own = set(clients[k]["tasks"])
            prim = scored[key]["primary"]
            clients[k]["scores"] = scored[key]
            clients[k]["own_task_score"] = _mean([v for t_, v in prim.items() if t_ in own])
            clients[k]["other_task_score"] = _mean([v for t_, v in prim.items() if t_ not in own])
    if learn:
        results["learning"] = learning_after(cfg, tok, strategy, partitions, before, out, results)
    timings["eval"] = time.time() - t
    results["rounds"] = rounds
    results["blocks"] = [{"index": i, "id": b.id, "sparsity": b.sparsity} for i, b in enumerate(blocks)]
    results["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    results["seconds"]["total"] = round(time.time() - t_all, 1)
    results["peak_rss_mb"] = round(peak_rss_mb(), 1)
    results["heap"] = heap_mode()
    results["llm_fp32_mb"] = round(llm_mb, 1)
    atomic_write_json(out / "results.json", results)
    return results


# ----- the learning gate (legokit.learning) ---------------------------------------------------------------
def learning_items(cfg: ExperimentConfig, tasks: Sequence[str]) -> dict[str, list]:
    """The test items the learning gate scores per task: ``eval.n_learning`` (default ``eval.n``) drawn as
    ``score_model`` draws them, so with the default they are the global LLMs' items too."""
    n = cfg.eval.n_learning or cfg.eval.n
    draw = cfg.seed if cfg.eval.items == "per_seed" else None
    return {t: select_items(load_task(t, "test"), n, draw_seed=draw) for t in tasks}


def _score_own(model, tok, cfg: ExperimentConfig, items: dict[str, list]) -> list[dict]:
    recs = score_tasks(model, tok, items, batch_size=cfg.eval.batch_size, seed=cfg.seed, scoring=cfg.eval.scoring)
    return [r for t in items for r in recs[t]]


def _saved_items(path: Path) -> list[dict] | None:
    """The per-item records at ``path`` (``evaluate.read_items``), or None when missing or unreadable: scored again."""
    try:
        return read_items(path)
    except (OSError, ValueError):  # LegokitError is a ValueError
        return None


def learning_before(cfg: ExperimentConfig, tok, blocks: list, partitions, out: str | Path | None = None) -> dict:
    """Each client's block scored untrained on the client's own tasks (``learning_items``): ``{client: records}``.

    Call it before the first round (a ``merge`` broadcast changes the blocks). With ``out`` (a run directory) the
    records are kept in ``items/learning-before-client<k>.jsonl`` and a resumed run reuses them.
    """
    assignment = assign_blocks(cfg, blocks)
    scored: dict[tuple, list[dict]] = {}
    before = {}
    for k in range(cfg.fed.num_clients):
        tasks = sorted({ex.task for ex in partitions[k]})
        path = None if out is None else Path(out) / "items" / f"learning-before-client{k}.jsonl"
        saved = None if path is None else _saved_items(path)
        if saved is not None and sorted({r["task"] for r in saved}) == tasks:
            before[k] = saved
            continue
        key = (assignment[k], tuple(tasks))
        if key not in scored:
            block = blocks[assignment[k]]
            try:
                scored[key] = _score_own(block.model, tok, cfg, learning_items(cfg, tasks))
            finally:
                block.release()
        before[k] = scored[key]
        if path is not None:
            write_items(path, before[k])
    return before


def learning_after(cfg: ExperimentConfig, tok, strategy, partitions, before: dict, out: str | Path | None = None,
                   results: dict | None = None) -> dict:
    """The ``learning`` object after training: per client its block's own-task gain over ``before``
    (``learning_before``), the global LLM's gain over ``base`` on the trained tasks (when ``results`` holds both,
    with per-item records in ``out``), and the gate (``legokit.learning.gate``).

    The block after training is what the client runs from then on (``federation.block_model``: the final global
    update through its mask; in the ``local`` reference, its own adapter). With ``out``, the records are kept in
    ``items/learning-after-client<k>.jsonl``.
    """
    rows = []
    for k in range(cfg.fed.num_clients):
        tasks = sorted({ex.task for ex in partitions[k]})
        items = learning_items(cfg, tasks)
        examples = [ex for exs in items.values() for ex in exs]
        client = None if strategy.has_global else k
        with block_model(strategy, strategy.assignment[k], client) as model:
            after = _score_own(model, tok, cfg, items)
        if out is not None:
            write_items(Path(out) / "items" / f"learning-after-client{k}.jsonl", after)
        rows.append({"client": k, "sparsity": strategy.block_of(k).sparsity, "tasks": tasks,
                     **gain(before[k], after, examples, seed=cfg.seed)})
    verdict = gate(rows)
    trained = sorted({t for r in rows for t in r["tasks"]})
    glob = None
    results = results or {}
    if out is not None and "base" in results and "global" in results and results["global"] is not results["base"]:
        glob = global_gain(_saved_items(Path(out) / "items" / results["base"]["items"]),
                           _saved_items(Path(out) / "items" / results["global"]["items"]), trained, cfg)
    return {**verdict, "scoring": cfg.eval.scoring, "format": cfg.train.format,
            "items": cfg.eval.n_learning or cfg.eval.n, "clients": rows, "global": glob}


def global_gain(base: list[dict] | None, glob: list[dict] | None, tasks: Sequence[str], cfg: ExperimentConfig,
                seed: int | None = None) -> dict | None:
    """The global LLM minus ``base`` on ``tasks`` (the trained tasks), paired over the same test items."""
    if not base or not glob:
        return None
    pick = lambda recs: [r for r in recs if r["task"] in tasks]  # noqa: E731
    examples = [ex for t in tasks for ex in load_task(t, "test")]
    return {"tasks": list(tasks), **gain(pick(base), pick(glob), examples,
                                         seed=cfg.seed if seed is None else seed)}


def _saved_scores(path: Path, cfg: ExperimentConfig) -> dict | None:
    """The base scores a resumed run can reuse: ``path`` when it reads back and was scored as ``cfg`` scores
    (items, tasks, scoring); None to score again (the scores are derived: rescoring is always right)."""
    try:
        saved = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    tasks = cfg.eval.tasks
    ok = (isinstance(saved, dict) and saved.get("n") == cfg.eval.n and saved.get("scoring") == cfg.eval.scoring
          and isinstance(saved.get("primary"), dict) and (tasks is None or list(saved["primary"]) == list(tasks)))
    return saved if ok else None


def _round_failures(rounds: list[dict], metrics: list[dict]) -> dict:
    """``failed_rounds`` (rounds in which no client trained) and, when there are any, a ``failure`` message
    that names them and the first client error of each kind (``metrics.jsonl`` holds every one)."""
    empty = [r["round"] for r in rounds if not r.get("clients")]
    if not empty:
        return {"failed_rounds": []}
    errors = list(dict.fromkeys(m["error"] for m in metrics if m["round"] in empty and m.get("error")))
    which = (f"any of the {len(rounds)} rounds" if len(empty) == len(rounds)
             else "round" + "s" * (len(empty) > 1) + " " + ", ".join(map(str, empty)) + f" of {len(rounds)}")
    outcome = ("the global LLM and the blocks are the untrained ones" if len(empty) == len(rounds)
               else "those rounds kept the previous global state")
    cause = f"; client error: {errors[0]}" if errors else ""
    return {"failed_rounds": empty,
            "failure": f"no client trained in {which} ({outcome}){cause}; every client's error is "
                       "in metrics.jsonl: fix the cause and run again in another output directory"}


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def results_table(results: dict) -> str:
    """A plain-text table of a run's headline numbers (per model: tasks, mean, perplexity)."""
    rows = []
    untrained = bool(results.get("rounds")) and len(results.get("failed_rounds") or []) == len(results["rounds"])
    for label in ("base", "global"):
        if label in results:
            rows.append((label + " LLM" + " (untrained)" * (label == "global" and untrained), results[label]))
    seen = set()
    for c in results.get("clients", []):
        if "scores" in c:
            own = not aggregator_has_global(results.get("aggregator"))  # local: one model per client
            key = f'{c["block"]} (client {c["client"]})' if own else c["block"]
            if key not in seen:
                seen.add(key)
                rows.append((f"block {key}", c["scores"]))
    if not rows:
        return "(no scores)" + (f"\nRUN FAILED: {results['failure']}" if results.get("failure") else "")
    tasks = list(rows[0][1]["primary"])
    scoring = rows[0][1].get("scoring", "label")
    trained = f", trained in the {results['train_format']} format" if results.get("train_format") else ""
    note = (f"scores in points: choice tasks {scoring}-scored (accuracy){trained}, nq_open F1, asdiv exact match; "
            f"n = {rows[0][1].get('n', '?')} test items per task for the LLMs")
    head = f"{'model':34s}" + "".join(f"{t[:12]:>13s}" for t in tasks) + f"{'mean':>8s}{'ppl':>9s}"
    lines = [head, "-" * len(head)]
    for label, s in rows:
        lines.append(f"{label[:34]:34s}" + "".join(f"{100 * s['primary'][t]:13.1f}" for t in tasks)
                     + f"{100 * s['mean_score']:8.1f}{s['perplexity']:9.2f}")
    failed = [f"round {r['round']}: {r['failed']}" for r in results.get("rounds") or [] if r.get("failed")]
    if failed:
        lines.append("clients that failed (metrics.jsonl has their errors): " + "; ".join(failed))
    if results.get("failure"):  # a table of untrained models must not read as a result
        lines.append(f"RUN FAILED: {results['failure']}")
    lines += privacy_lines(results)
    if results.get("learning"):
        lines += ["", format_table(results["learning"])]
    return "\n".join([note, *lines])


# ----- a set of conditions on one config ------------------------------------------------------------------
def run_conditions(cfg, conditions: Sequence[str], run_dir: str | Path, *,
                   block_conditions: Sequence[str] | None = None, progress: bool = True) -> dict[str, dict]:
    """Run each condition into ``run_dir/<condition>`` (``experiment.run_condition``), or load it when finished.

    Every condition shares ``cfg`` (seeds, data, budget); only the condition's overrides differ. The building
    blocks are extracted once and hard-linked into the other conditions' directories (they depend only on the
    LLM, ``prune`` and the seed). The base LLM is scored once, by the ``base`` condition (``eval.base`` is off
    for the others).

    Args:
        cfg: the experiment's ``ExperimentConfig``.
        conditions: names from ``CONDITIONS``.
        run_dir: the parent directory; a condition whose ``results.json`` exists is loaded, not rerun.
        block_conditions: conditions whose blocks are scored too (None: all). C2 needs ``local`` and ``lego``.
        progress: progress bars.
    Returns:
        ``{condition: results}`` in the order given.
    Raises:
        LegokitError: an unknown condition, or a finished condition directory written with another config.
    """
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not conditions:
        raise LegokitError(f"conditions {bad or 'none'}: use names from {list(CONDITIONS)}")
    run_dir = Path(run_dir)
    mde = detectable_effect(cfg.eval.n, len(cfg.eval.tasks or [1]))
    if mde > THRESHOLDS["c1_points"]:
        warnings.warn(f"eval.n={cfg.eval.n} test items per task on {len(cfg.eval.tasks or [1])} task(s) detects a C1 "
                      f"margin of about {mde:.1f} points (80% power, one seed), wider than C1's "
                      f"{THRESHOLDS['c1_points']:g}-point threshold: expect 'inconclusive' verdicts; raise eval.n "
                      "or run more seeds", stacklevel=2)
    out: dict[str, dict] = {}
    for cond in conditions:
        blocks = block_conditions is None or cond in block_conditions
        # the learning gate of the claims reads the local condition's blocks (claims.learning): only it scores them
        ccfg = cfg.with_overrides({"eval.base": False, "eval.blocks": bool(blocks),
                                   "eval.learning": cfg.eval.learning and cond == "local"})
        d = run_dir / cond
        stamp = d / "condition.json"
        want = {"condition": cond, "config": ccfg.to_dict()}
        if (d / "results.json").is_file():
            have = json.loads(stamp.read_text()) if stamp.is_file() else None
            written = json.loads(json.dumps(want))  # as the stamp reads back (tuples become lists)
            if have != written:
                diff = "no condition.json" if have is None else first_difference(have, written)
                raise LegokitError(f"{d} holds results of another configuration ({diff}): "
                                   f"choose another RUN_DIR, or delete {d} to rerun it")
            out[cond] = {**json.loads((d / "results.json").read_text()), "run_dir": str(d)}
            continue
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stamp, want)
        if not (d / "blocks" / "index.json").is_file():
            _share_blocks(run_dir, d, ccfg)
        out[cond] = {**run_condition(ccfg, cond, d, resume=True, progress=progress), "run_dir": str(d)}
        if out[cond].get("failure"):  # its numbers are those of untrained models: no claim should rest on them
            warnings.warn(f"condition {cond} ({d}): {out[cond]['failure']}", stacklevel=2)
    return out


def _share_blocks(run_dir: Path, dest: Path, cfg) -> None:
    """Hard-link (copy where links fail) into ``dest`` the blocks a sibling condition extracted with the same
    LLM, seed and ``prune`` settings (read from its ``condition.json``)."""
    key = _blocks_key(cfg.to_dict())
    for src in sorted(run_dir.glob("*/blocks/index.json")):
        stamp = src.parent.parent / "condition.json"
        if src.parent.parent == dest or not stamp.is_file():
            continue
        if _blocks_key(json.loads(stamp.read_text())["config"]) != key:
            continue
        try:
            shutil.copytree(src.parent, dest / "blocks", copy_function=os.link)
        except OSError:
            shutil.rmtree(dest / "blocks", ignore_errors=True)
            shutil.copytree(src.parent, dest / "blocks")
        return


def _blocks_key(config: dict) -> str:
    """What a condition's blocks depend on: the LLM, the seed and the pruning settings."""
    return json.dumps({k: config.get(k) for k in ("model", "seed", "prune")}, sort_keys=True)
