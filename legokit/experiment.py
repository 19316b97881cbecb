"""The whole LEGO pipeline behind ``legokit run`` and the experiment notebook.

config -> LLM -> building blocks -> client data -> rounds (``federation``) -> evaluation -> run directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from legokit.config import ExperimentConfig
from legokit.utils import LegokitError, atomic_write_json, atomic_write_text, peak_rss_mb, seed_everything

# The conditions of the LEGO experiment (issue: do heterogeneous SLM clients rebuild a robust LLM?).
# Each maps to overrides of one base config, so every condition shares seeds, data and budget.
CONDITIONS = {
    "base": {},  # zero-shot: the LLM and every block before any training
    "local": {"fed.aggregator": "local"},  # each block fine-tuned on its own client's data only
    "fedavg_dense": {"fed.aggregator": "fedavg", "dense_clients": True},  # homogeneous dense clients
    "fedavg": {"fed.aggregator": "fedavg"},  # heterogeneous blocks, mask-agnostic FedIT
    "lego": {"fed.aggregator": "heteagg"},  # heterogeneous blocks, HeteAgg
    "centralized": {"fed.aggregator": "centralized"},  # one LoRA on the pooled data
}


def condition_config(cfg: ExperimentConfig, condition: str) -> ExperimentConfig:
    """``cfg`` with the overrides of one experiment condition applied."""
    if condition not in CONDITIONS:
        raise LegokitError(f"unknown condition {condition!r}: use one of {list(CONDITIONS)}")
    over = dict(CONDITIONS[condition])
    if over.pop("dense_clients", False):
        over["fed.client_sparsities"] = [0.0] * cfg.fed.num_clients
        over["fed.devices"] = None
    return cfg.with_overrides(over) if over else cfg


# The task name of held-out-text windows in per-item files (``score_model``).
HELDOUT = "heldout_text"


def primary_metric(task: str) -> str:
    """The headline metric of a task (the one averaged into ``mean_score``)."""
    from legokit.data import TASKS

    return TASKS[task].primary


def score_model(model, tokenizer, cfg: ExperimentConfig, progress: bool = True, *, n: int | None = None,
                items_file: str | Path | None = None) -> dict:
    """Task scores, their mean over primary metrics, and held-out corpus perplexity.

    Args:
        n: test items per task (default ``cfg.eval.n``); drawn per seed when ``cfg.eval.items == "per_seed"``.
        items_file: where to write the per-item records (JSON lines, one per test item, ``task`` and ``uid``
            included), so two models can be compared item by item; its name is recorded under ``items``.
    Returns:
        ``{"tasks": {task: metrics}, "primary": {task: value}, "mean_score", "perplexity", "scoring", "n",
        "items"}``.
    """
    from legokit.data import TASKS, eval_texts
    from legokit.evaluate import score_tasks, summarize, window_nlls

    tasks = cfg.eval.tasks or list(TASKS)
    n = cfg.eval.n if n is None else n
    draw = cfg.seed if cfg.eval.items == "per_seed" else None
    records = score_tasks(model, tokenizer, tasks, split="test", n=n, batch_size=cfg.eval.batch_size,
                          seed=cfg.seed, scoring=cfg.eval.scoring, draw_seed=draw)
    scores = {t: summarize(t, recs) for t, recs in records.items()}
    windows = window_nlls(model, tokenizer, eval_texts(cfg.eval.ppl_texts, seed=cfg.seed), seq_len=cfg.eval.seq_len,
                          batch_size=cfg.eval.batch_size)
    ppl = float(np.exp(sum(s for s, _ in windows) / sum(k for _, k in windows)))
    # held-out text as items too: a window's mean NLL (C3 compares perplexities window by window)
    records[HELDOUT] = [{"uid": f"window-{i:03d}", "task": HELDOUT, "nll": s / k, "tokens": k}
                        for i, (s, k) in enumerate(windows)]
    primary = {t: scores[t][primary_metric(t)] for t in tasks}
    out = {"tasks": scores, "primary": primary, "mean_score": float(np.mean(list(primary.values()))),
           "perplexity": ppl, "scoring": cfg.eval.scoring, "n": n}
    if items_file is not None:
        items_file = Path(items_file)
        atomic_write_text(items_file, "".join(json.dumps(r) + "\n" for recs in records.values() for r in recs))
        out["items"] = items_file.name
    return out


def client_partitions(cfg: ExperimentConfig) -> list[list]:
    """Draw ``data.train_examples`` training examples over the tasks and split them between clients."""
    from legokit.data import load_task, partition

    per_task = max(1, cfg.data.train_examples // len(cfg.data.tasks))
    pool = []
    for task in cfg.data.tasks:
        examples = load_task(task, "train")
        if len(examples) < per_task:
            raise LegokitError(f"task {task!r} has {len(examples)} training examples, fewer than the "
                               f"{per_task} asked for: lower data.train_examples")
        pool.extend(examples[:per_task])
    return partition(pool, cfg.fed.num_clients, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.seed,
                     tasks_per_client=cfg.data.tasks_per_client)


def load_or_extract_blocks(cfg: ExperimentConfig, llm, tokenizer, run_dir: Path, progress: bool = True) -> list:
    """The building blocks of this run: loaded from ``run_dir/blocks`` when present, else extracted."""
    from legokit.blocks import Block, extract_blocks
    from legokit.data import calibration_texts

    bdir = run_dir / "blocks"
    index = bdir / "index.json"
    if index.is_file():
        ids = json.loads(index.read_text())["blocks"]
        return [Block.load(bdir / f"{i}", llm) for i in range(len(ids))]
    p = cfg.prune
    blocks = extract_blocks(llm, tokenizer, sparsities=tuple(p.sparsities), method=p.method, pattern=p.pattern,
                            calibration=p.calibration, n_calib=p.n_calib, seq_len=p.seq_len, seed=cfg.seed,
                            texts=calibration_texts(p.n_calib, seed=cfg.seed))
    for i, b in enumerate(blocks):
        b.save(bdir / f"{i}")
    atomic_write_json(index, {"blocks": [b.id for b in blocks]})
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
                   inject_failures: dict | None = None, train: bool = True) -> dict:
    """Run one LEGO experiment end to end and write ``results.json``; return the results.

    ``train=False`` is the zero-shot reference: the LLM and every client's block scored untrained.
    """
    from legokit.federation import block_model, global_model, run_federation
    from legokit.models import load_model, param_bytes
    from legokit.strategy import build_strategy

    out = Path(out_dir)
    timings: dict[str, float] = {}
    t_all = t = time.time()
    seed_everything(cfg.seed)
    torch.use_deterministic_algorithms(False)
    llm, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    llm_mb = param_bytes(llm) / 2**20
    timings["load"] = time.time() - t
    partitions = client_partitions(cfg)  # fail fast on data problems, before any heavy work
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    blocks = load_or_extract_blocks(cfg, llm, tok, out, progress)
    timings["extract"] = time.time() - t

    results: dict = {"name": cfg.name, "model": cfg.model, "aggregator": cfg.fed.aggregator,
                     "broadcast": cfg.fed.broadcast, "seed": cfg.seed}
    base_file = out / "base_scores.json"
    if cfg.eval.base:
        t = time.time()
        if resume and base_file.is_file():
            results["base"] = json.loads(base_file.read_text())
        else:
            results["base"] = score_model(llm, tok, cfg, progress, items_file=out / "items" / "base.jsonl")
            atomic_write_json(base_file, results["base"])
        timings["eval_base"] = time.time() - t

    t = time.time()
    if train:
        fed = run_federation(cfg, llm, tok, blocks, partitions, out, resume=resume, progress=progress,
                             inject_failures=inject_failures)
        strategy, rounds = fed.strategy, fed.rounds
    else:  # no round: the initial global state has B = 0, so every model is the untrained one
        strategy, rounds = build_strategy(cfg, llm, blocks, progress=progress), []
        results["condition"] = "base"
    timings["federation"] = time.time() - t

    t = time.time()
    if not train and "base" in results:
        results["global"] = results["base"]
    elif cfg.fed.aggregator != "local":
        with global_model(strategy, llm) as model:
            results["global"] = score_model(model, tok, cfg, progress, items_file=out / "items" / "global.jsonl")
    clients = []
    for k in range(cfg.fed.num_clients):
        tasks = sorted({ex.task for ex in partitions[k]})
        clients.append({"client": k, "block": blocks[strategy.assignment[k]].id,
                        "sparsity": blocks[strategy.assignment[k]].sparsity, "num_examples": len(partitions[k]),
                        "tasks": tasks})
    results["clients"] = clients
    if cfg.eval.blocks and cfg.fed.aggregator != "centralized":
        scored = {}
        for k in range(cfg.fed.num_clients):
            # Federated modes give every holder of a block the same model; `local` keeps one per client.
            key = k if cfg.fed.aggregator == "local" else strategy.assignment[k]
            if key not in scored:
                client = k if cfg.fed.aggregator == "local" else None
                label = f"block-{blocks[strategy.assignment[k]].id}" + ("" if client is None else f"-client{k}")
                with block_model(strategy, strategy.assignment[k], client) as model:
                    scored[key] = score_model(model, tok, cfg, progress, n=cfg.eval.n_blocks,
                                              items_file=out / "items" / f"{label}.jsonl")
            own = set(clients[k]["tasks"])
            prim = scored[key]["primary"]
            clients[k]["scores"] = scored[key]
            clients[k]["own_task_score"] = _mean([v for t_, v in prim.items() if t_ in own])
            clients[k]["other_task_score"] = _mean([v for t_, v in prim.items() if t_ not in own])
    timings["eval"] = time.time() - t
    results["rounds"] = rounds
    results["blocks"] = [{"index": i, "id": b.id, "sparsity": b.sparsity} for i, b in enumerate(blocks)]
    results["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    results["seconds"]["total"] = round(time.time() - t_all, 1)
    results["peak_rss_mb"] = round(peak_rss_mb(), 1)
    results["llm_fp32_mb"] = round(llm_mb, 1)
    atomic_write_json(out / "results.json", results)
    return results


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def results_table(results: dict) -> str:
    """A plain-text table of a run's headline numbers (per model: tasks, mean, perplexity)."""
    rows = []
    for label in ("base", "global"):
        if label in results:
            rows.append((label + " LLM", results[label]))
    seen = set()
    for c in results.get("clients", []):
        if "scores" in c:
            key = c["block"] if results.get("aggregator") != "local" else f'{c["block"]} (client {c["client"]})'
            if key not in seen:
                seen.add(key)
                rows.append((f"block {key}", c["scores"]))
    if not rows:
        return "(no scores)"
    tasks = list(rows[0][1]["primary"])
    scoring = rows[0][1].get("scoring", "label")
    note = (f"scores in points: choice tasks {scoring}-scored (accuracy), nq_open F1, asdiv exact match; "
            f"n = {rows[0][1].get('n', '?')} test items per task for the LLMs")
    head = f"{'model':34s}" + "".join(f"{t[:12]:>13s}" for t in tasks) + f"{'mean':>8s}{'ppl':>9s}"
    lines = [head, "-" * len(head)]
    for label, s in rows:
        lines.append(f"{label[:34]:34s}" + "".join(f"{100 * s['primary'][t]:13.1f}" for t in tasks)
                     + f"{100 * s['mean_score']:8.1f}{s['perplexity']:9.2f}")
    return "\n".join([note, *lines])
