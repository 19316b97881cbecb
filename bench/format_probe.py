"""Which training format moves a choice task's held-out score: today's chat label, or the cloze option it is scored on.

For each choice task, one dense client of the model (LoRA on every projection, no mask) trains locally on the
task's train split in two formats, from the same initialisation, on the same examples in the same batches:

  chat-label    ``train.format: chat``: the chat-rendered prompt, then the label
                (``yes``/``no``, ``A``..``E``) and the end-of-turn token (``legokit.data.encode``).
  cloze-option  the plain cloze context the harness scorer reads (``Example.context``, no chat template, no BOS),
                then the gold option's own text, tokenized exactly as ``legokit.data.harness_requests`` lays
                out the scored request (no end-of-turn token: the scorer scores none): ``train.format: cloze``.

Before and after each run the same validation items (the first ``--n`` of the seeded validation split; never test
items) are scored both ways (``score_tasks``, scoring ``harness`` and ``label``). A row gives before, after, the paired
change (after - before, points) with its 95% paired bootstrap interval (``legokit.stats.paired_difference``), the
share of the most common predicted answer after training, the majority-answer baseline of the items, and how many
trained examples ``max_len`` truncated (a truncated example is not what is scored).

Run:  .venv/bin/python bench/format_probe.py [--tasks boolq commonsense_qa piqa mmlu] [--n 200] [--steps 48]
      [--lr 5e-4 1e-4] [--model tiny-llama] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from machine import gemm_gflops

from legokit.config import LoraConfig, TrainConfig
from legokit.data import TASKS, Example, load_task, tokenize_example
from legokit.evaluate import score_tasks, select_items
from legokit.lora import attach_lora, detach_lora
from legokit.models import load_model
from legokit.names import DEFAULT_MODEL
from legokit.stats import paired_difference
from legokit.train import batch_order, train_client
from legokit.utils import seed_everything

# the probe's names for legokit's training formats (names.TRAIN_FORMATS)
FORMATS = {"chat-label": "chat", "cloze-option": "cloze"}
SCORINGS = ("harness", "label")
CHOICE_TASKS = [t for t, spec in TASKS.items() if spec.kind == "choice"]


def truncated(examples: Sequence[Example], tokenizer, fmt: str, cfg: TrainConfig, seed: int) -> int:
    """How many of the examples the steps reach are longer than ``cfg.max_len`` in format ``fmt``."""
    reached = {i for b in batch_order(len(examples), cfg.local_steps, cfg.batch_size, seed) for i in b}
    return sum(sum(map(len, tokenize_example(examples[i], tokenizer, FORMATS[fmt]))) > cfg.max_len for i in reached)


def top_share(records: Sequence[dict], items: Sequence[Example]) -> tuple[float, str]:
    """Share of the most common predicted option, and its label (``yes``, ``A``, ...)."""
    index, count = collections.Counter(r["prediction"] for r in records).most_common(1)[0]
    return count / len(records), items[0].choices[index]


def change(before: Sequence[dict], after: Sequence[dict], task: str, seed: int) -> dict:
    """Before / after accuracy and the paired change (points) with its 95% bootstrap interval."""
    def cells(recs: Sequence[dict]) -> dict:
        return {(seed, task): {r["uid"]: 100.0 * r["correct"] for r in recs}}

    diff = paired_difference(cells(after), cells(before), seed=seed)
    mean = lambda recs: 100.0 * sum(r["correct"] for r in recs) / len(recs)  # noqa: E731
    return {"before": mean(before), "after": mean(after), "change": diff.estimate, "low": diff.low,
            "high": diff.high}


def probe_task(model, tok, task: str, args: argparse.Namespace) -> dict:
    """Both formats (every lr) of one task: before/after under both scorings, as rows."""
    train = load_task(task, "train")
    items = select_items(load_task(task, "validation"), args.n)

    def score() -> dict[str, list[dict]]:
        return {s: score_tasks(model, tok, {task: items}, scoring=s, seed=args.seed)[task] for s in SCORINGS}

    seed_everything(args.seed)
    before = score()
    gold, n_gold = collections.Counter(ex.answer_index for ex in items).most_common(1)[0]
    out = {"task": task, "items": len(items), "train_examples": len(train),
           "majority": {"share": n_gold / len(items), "answer": items[0].choices[gold]},
           "before_top": {s: top_share(before[s], items) for s in SCORINGS}, "runs": []}
    for lr in args.lr:
        cfg = TrainConfig(local_steps=args.steps, batch_size=args.batch_size, lr=lr, max_len=args.max_len)
        for fmt in FORMATS:
            seed_everything(args.seed)
            attach_lora(model, LoraConfig(rank=args.rank, alpha=args.alpha), seed=args.seed)
            try:
                res = train_client(model, tok, train, replace(cfg, format=FORMATS[fmt]), seed=args.seed,
                                   client=f"{task}/{fmt}")
                after = score()
            finally:
                detach_lora(model)  # no merge: the base weights are untouched for the next run
            run = {"lr": lr, "format": fmt, "final_loss": res.final_loss, "train_seconds": res.seconds,
                   "response_tokens": res.response_tokens, "truncated": truncated(train, tok, fmt, cfg, args.seed)}
            for s in SCORINGS:
                share, label = top_share(after[s], items)
                run[s] = {**change(before[s], after[s], task, args.seed), "top_share": share, "top_answer": label}
            out["runs"].append(run)
            print(f"  {task} lr={lr:g} {fmt}: loss {res.final_loss:.3f}, " + ", ".join(
                f"{s} {run[s]['before']:.1f} -> {run[s]['after']:.1f}" for s in SCORINGS), flush=True)
    return out


def table(results: Sequence[dict]) -> str:
    """The markdown table of every task, lr, format and scoring."""
    head = ("| task | items | lr | format | scoring | before | after | change [95% CI] | top answer after "
            "| majority baseline | truncated |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for t in results:
        maj = t["majority"]
        for run in t["runs"]:
            for s in SCORINGS:
                r = run[s]
                lines.append(
                    f"| {t['task']} | {t['items']} | {run['lr']:g} | {run['format']} | {s} | {r['before']:.1f} "
                    f"| {r['after']:.1f} | {r['change']:+.1f} [{r['low']:+.1f}, {r['high']:+.1f}] "
                    f"| {100 * r['top_share']:.0f}% {r['top_answer']} | {100 * maj['share']:.0f}% {maj['answer']} "
                    f"| {run['truncated']} |")
    return "\n".join(lines)


def machine_line(device: torch.device) -> tuple[str, dict]:
    """CPU model, torch threads, fp32 GEMM rate (``machine.gemm_gflops``) and the GPU when one runs the model."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    info = {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(), "gemm_gflops": gemm_gflops(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    gpu = f"; model on {info['gpu']}" if info["gpu"] else ""
    return (f"# {cpu}; torch {info['torch']}, {info['threads']} threads; fp32 GEMM {info['gemm_gflops']:.1f} "
            f"GFLOP/s{gpu}"), info


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["boolq", "commonsense_qa", "piqa", "mmlu"],
                    help=f"choice tasks (space- or comma-separated): {', '.join(CHOICE_TASKS)}")
    ap.add_argument("--n", type=int, default=200, help="validation items per task (the first n of the split)")
    ap.add_argument("--steps", type=int, default=48, help="local training steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, nargs="+", default=[5e-4], help="learning rate(s); several sweep")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--max-len", type=int, default=TrainConfig.max_len, help="training tokens per example")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"{DEFAULT_MODEL} | tiny-llama | a checkpoint path")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    args.tasks = [t for arg in args.tasks for t in arg.split(",") if t]
    for t in args.tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; choice tasks: {', '.join(CHOICE_TASKS)}")
        if TASKS[t].kind != "choice":
            ap.error(f"{t!r} is a {TASKS[t].kind} task: it has no options, so there is no cloze-option format to "
                     f"compare; use choice tasks: {', '.join(CHOICE_TASKS)}")
    if args.n < 1:
        ap.error(f"--n {args.n}: score at least one validation item per task")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    seed_everything(args.seed)
    model, tok = load_model(args.model, device=args.device)
    line, machine = machine_line(next(model.parameters()).device)
    print(line, flush=True)
    print(f"model {args.model}; one dense client: LoRA rank {args.rank}, alpha {args.alpha:g}, {args.steps} steps x "
          f"batch {args.batch_size}, max_len {args.max_len}, seed {args.seed}; validation items", flush=True)
    results = [probe_task(model, tok, task, args) for task in args.tasks]
    print("\n" + table(results))
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "machine": machine,
           "tasks": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
