"""The ``legokit`` command: setup, eval, run, tune, export-tasks, export, plan, audit, sweep and report (and
the Flower commands)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from legokit.names import CACHED_MODEL_NAMES, DEFAULT_MODEL, GEMMA_MODEL
from legokit.utils import LegokitError, lean_heap

# Each command imports the legokit modules it runs inside its own function, so that `legokit --help`, a mistyped
# command and the light commands answer without loading torch and transformers.


def _cmd_setup(args: argparse.Namespace) -> None:
    from legokit.assets import setup

    t0 = time.time()
    manifest = setup(force=args.force, model=args.model)
    n = len(manifest["files"])
    print(f"legokit setup: {n} files verified in the cache ({time.time() - t0:.1f} s)")


def _cmd_eval(args: argparse.Namespace) -> None:
    """Zero-shot evaluation of one model on every task plus corpus perplexity."""
    from legokit.config import EvalConfig, ExperimentConfig
    from legokit.evaluate import score_model
    from legokit.experiment import results_table
    from legokit.models import load_model, warn_preflight
    from legokit.utils import atomic_write_json, seed_everything

    cfg = ExperimentConfig(model=args.model, device=args.device,
                           eval=EvalConfig(tasks=args.tasks, n=args.n, ppl_texts=args.ppl_texts, scoring=args.scoring,
                                           items="first"))
    warn_preflight(cfg)
    seed_everything(cfg.seed)
    t0 = time.time()
    model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    out = Path(args.out)
    scores = score_model(model, tok, cfg, items_file=out / "items" / "base.jsonl")
    results = {"name": "zero-shot", "model": cfg.model, "n": args.n, "base": scores,
               "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out / "results.json", results)
    print(results_table(results))
    print(f"\n(n={args.n} test examples per task (the first n), {args.ppl_texts} held-out paragraphs; per-item "
          f"records in {out / 'items'}; "
          f"{results['seconds']} s; written to {out / 'results.json'})")


def _cmd_run(args: argparse.Namespace) -> int:
    from legokit.config import load_config
    from legokit.experiment import results_table, run_experiment
    from legokit.models import warn_preflight

    cfg = load_config(args.config, args.set)
    out = Path(args.out)
    resume = args.resume or args.resume_round is not None
    if resume and not (out / "config.yaml").is_file():
        raise LegokitError(f"--resume: {out} holds no run (no config.yaml): drop --resume to start a new run there, "
                           "or point --out at the directory of the run to continue")
    warn_preflight(cfg)
    if args.lean_memory:
        lean_heap()
    results = run_experiment(cfg, args.out, resume=resume, resume_round=args.resume_round)
    print(results_table(results))
    s = results["seconds"]
    print(f"\n{cfg.name}: {cfg.fed.num_clients} clients, {cfg.fed.rounds} rounds, aggregator {cfg.fed.aggregator}, "
          f"broadcast {cfg.fed.broadcast}; {s['total']} s total; peak RSS {results['peak_rss_mb']:.0f} MiB "
          f"({results['peak_rss_mb'] / results['llm_fp32_mb']:.2f}x the LLM's fp32 size"
          f"{', lean heap' * args.lean_memory}); run directory {args.out}")
    if results.get("failure"):  # the table above says so too; a script must see it in the exit status
        print(f"legokit: error: the run failed: {results['failure']}", file=sys.stderr)
        return 1
    return 0


def _cmd_tune(args: argparse.Namespace) -> None:
    """Learnability on the validation split: a dense client's own-task gain per task, lr and step count."""
    from legokit.learning import tune, tune_table
    from legokit.utils import atomic_write_json

    tasks = [t for arg in args.tasks for t in arg.split(",") if t]
    rows = tune(tasks, lrs=args.lr, steps=args.steps, n=args.n, split=args.split, model=args.model, rank=args.rank,
                alpha=args.alpha, batch_size=args.batch_size, max_len=args.max_len, fmt=args.format,
                balance=args.balance, seed=args.seed, device=args.device)
    print("\n" + tune_table(rows))
    if args.json:
        atomic_write_json(args.json, {"args": {k: v for k, v in vars(args).items() if k != "func"}, "rows": rows})
        print(f"(written to {args.json})")


def _cmd_export_tasks(args: argparse.Namespace) -> None:
    """Choice-task items as lm-eval task files, and the lm_eval command that scores them."""
    from legokit.lmeval import export_tasks, lm_eval_command

    paths = export_tasks(args.dir, tasks=args.tasks, n=args.n)
    for p in paths:
        print(f"wrote {p} and {p.with_suffix('.jsonl').name}")
    print("\nscore them with lm-evaluation-harness (a checkpoint from `legokit export`, or any HF model):")
    print(lm_eval_command(args.dir, args.tasks))


def _cmd_export(args: argparse.Namespace) -> None:
    """A run's final global LLM or one block as a plain Hugging Face checkpoint."""
    from legokit.lmeval import export_checkpoint

    out = export_checkpoint(args.run, args.out, model=args.model, client=args.client, device=args.device)
    info = json.loads((out / "legokit_export.json").read_text())
    print(f"wrote {info['model']} of {args.run} (round {info['round']}) to {out}: load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r})")


def _cmd_audit(args: argparse.Namespace) -> None:
    """A membership-inference audit of a finished run: loss and reference attacks, AUC and TPR at low FPR."""
    from legokit.audit import audit_run, audit_table

    out = Path(args.out) if args.out else Path(args.run) / "audit.json"
    audit = audit_run(args.run, n=args.n, nonmembers=args.nonmembers, fpr=args.fpr, n_boot=args.n_boot,
                      device=args.device, out=out)
    print(audit_table(audit))
    print(f"\n(per-example losses and the rows written to {out})")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from legokit.sweep import sweep

    out = args.out or f"runs/sweep-{Path(args.grid).stem}"
    res = sweep(args.notebook, args.grid, out, force=args.force, progress=not args.no_progress)
    print(f"legokit sweep: {len(res.points)} points: {len(res.ran) - len(res.failed)} finished now, "
          f"{len(res.skipped)} skipped (finished before), {len(res.failed)} failed")
    print(f"results: {res.results_csv} ({len(res.results)} rows)"
          + (f"; summary: {res.summary_png}" if res.summary_png else ""))
    if res.failed:
        for name, err in res.failed.items():
            print(f"  FAILED {name}: {err}", file=sys.stderr)
        return 1
    return 0


def _cmd_plan(args: argparse.Namespace) -> None:
    from legokit.plan import plan_report

    sparsities = _numbers(args.sparsities, "--sparsities", "0,0.25,0.5,0.75")
    print(plan_report(args.model, _items(args.budgets), as_json=args.json, sparsities=sparsities,
                      patterns=_items(args.pattern), rank=args.rank, context=args.seq_len, dtype=args.dtype,
                      storage=args.storage))


def _items(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _numbers(text: str, flag: str, example: str) -> list[float]:
    try:
        return [float(t) for t in _items(text)]
    except ValueError:
        raise LegokitError(f"{flag} {text!r}: give comma-separated numbers, e.g. {example}") from None


def _cmd_report(args: argparse.Namespace) -> None:
    from legokit.report import report

    print(_lego_report(args.path) or report(args.path))


def _lego_report(path: str) -> str | None:
    """A LEGO run's tables (``experiment.results_table``); None for a sweep or for another notebook's results."""
    from legokit.report import locate, read_results

    kind, results_json = locate(path)
    if kind != "run":
        return None
    results = read_results(results_json)
    if not (isinstance(results, dict) and ("base" in results or "global" in results)):
        return None
    from legokit.experiment import results_table

    try:
        return f"{results_json}\n\n{results_table(results)}"
    except (KeyError, TypeError):
        return None  # not a LEGO run's layout after all: the generic report prints it flat


def add_sweep_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``sweep`` and ``report`` to the ``legokit`` command's subparsers."""
    s = sub.add_parser("sweep", help="run a notebook once per grid point (papermill) and collect results.csv")
    s.add_argument("notebook", nargs="?", default=None, help="the notebook (default: the grid file's 'notebook')")
    s.add_argument("--grid", required=True, help="the grid YAML, e.g. sweeps/NAME.yaml")
    s.add_argument("--out", default=None, help="the sweep directory (default: runs/sweep-<grid name>)")
    s.add_argument("--force", action="store_true",
                   help="rerun finished points, and sweep into a directory written by another grid")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_sweep)

    s = sub.add_parser("report", help="print the results of a sweep directory or of one run directory")
    s.add_argument("path", help="a sweep directory (sweep.json) or a run directory (results.json)")
    s.set_defaults(func=_cmd_report)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="legokit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("setup", help="fetch and prepare the offline model and data (idempotent)")
    s.add_argument("--force", action="store_true", help="rebuild everything even if the cache verifies")
    s.add_argument("--model", default=DEFAULT_MODEL, choices=CACHED_MODEL_NAMES,
                   help=f"the LLM to fetch and convert besides the task data (default {DEFAULT_MODEL}; "
                        f"{GEMMA_MODEL}: Gemma 3 270M, Gemma terms of use apply)")
    s.set_defaults(func=_cmd_setup)

    s = sub.add_parser("eval", help="zero-shot scores of a model on every task plus corpus perplexity")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--tasks", nargs="*", default=None, help="default: every task")
    s.add_argument("--n", type=int, default=50, help="test examples per task")
    s.add_argument("--ppl-texts", type=int, default=64, help="held-out paragraphs for perplexity")
    s.add_argument("--scoring", default="harness", help="choice tasks: harness (lm-eval acc on option text) | label")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", default="runs/zero-shot")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("run", help="run one LEGO experiment from a config")
    s.add_argument("--config", required=True, help="a YAML file or a shipped profile name (quick, full)")
    s.add_argument("--out", required=True, help="the run directory")
    s.add_argument("--resume", action="store_true", help="continue a crashed run from its last finished round")
    s.add_argument("--resume-round", type=int, default=None, metavar="N",
                   help="continue from finished round N instead (implies --resume; later rounds run again): "
                        "the way past a damaged last round")
    s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. fed.rounds=3")
    s.add_argument("--lean-memory", action="store_true",
                   help="hand large freed buffers back to the system at once (glibc): a lower peak RSS for "
                        "slower training; the numbers are the same (docs/measurements.md, memory)")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("tune", help="learnability on the validation split: a dense client's own-task gain per task, "
                                    "lr and step count (paired, 95%% interval, majority-answer baseline)")
    s.add_argument("--tasks", nargs="+", required=True, help="tasks (space- or comma-separated)")
    s.add_argument("--lr", type=float, nargs="+", default=[5e-4], help="learning rates (default: %(default)s)")
    s.add_argument("--steps", type=int, nargs="+", default=[48], help="step counts scored (default: %(default)s)")
    s.add_argument("--n", type=int, default=200, help="validation items per task (default: %(default)s)")
    s.add_argument("--split", default="validation", help="only 'validation' is accepted: test items stay unseen")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--alpha", type=float, default=16.0)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--max-len", type=int, default=256)
    s.add_argument("--format", default="cloze", help="training format of choice tasks: cloze | chat")
    s.add_argument("--balance", action="store_true", help="train on label-balanced examples (data.balance_labels)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--json", default=None, metavar="OUT", help="also write the rows as JSON here")
    s.set_defaults(func=_cmd_tune)

    from legokit.lmeval import DEFAULT_TASKS

    s = sub.add_parser("export-tasks", help="write choice-task test items as lm-evaluation-harness task files")
    s.add_argument("dir", help="the directory to write (lm_eval's --include_path)")
    s.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="choice tasks (default: %(default)s)")
    s.add_argument("--n", type=int, default=None, help="first N test items per task (default: all)")
    s.set_defaults(func=_cmd_export_tasks)

    s = sub.add_parser("export", help="write a run's final global LLM or a block as a Hugging Face checkpoint")
    s.add_argument("run", help="the run directory")
    s.add_argument("--model", default="global", help="'global', or a block id or index (RUN/blocks/index.json)")
    s.add_argument("--client", type=int, default=None, help="local runs: the client whose own model to export")
    s.add_argument("--out", required=True, help="the checkpoint directory")
    s.add_argument("--device", default="cpu", help="where to rebuild the model (default: %(default)s)")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("plan", help="which block each client's memory budget holds: bytes and FLOPs per token, "
                                    "computed from the model's shapes without building it")
    s.add_argument("--model", default=DEFAULT_MODEL,
                   help="a model name, checkpoint directory, config.json or shape preset (llama-1b, llama-7b)")
    s.add_argument("--budgets", required=True, help="client memory budgets, comma-separated, e.g. 512MiB,2GiB,8GiB")
    s.add_argument("--sparsities", default="0,0.25,0.5,0.75", help="block sparsities (default: %(default)s)")
    s.add_argument("--pattern", default="unstructured,structured",
                   help="patterns, comma-separated: unstructured, structured, N:M (default: %(default)s)")
    s.add_argument("--rank", type=int, default=8, help="the clients' LoRA rank (default: %(default)s)")
    s.add_argument("--seq-len", type=int, default=256, help="tokens of context of the FLOPs (default: %(default)s)")
    s.add_argument("--dtype", default="float32", help="the weights' dtype: float32, bfloat16, float16")
    s.add_argument("--storage", default="runtime",
                   help="runtime (weights as legokit runs a block) | sparse (kept values only) (default: %(default)s)")
    s.add_argument("--json", action="store_true", help="print JSON instead of the table")
    s.set_defaults(func=_cmd_plan)
    s = sub.add_parser("audit", help="membership-inference audit of a finished run: can its global LLM and blocks "
                                     "tell the clients' training examples from unseen ones (AUC, TPR at low FPR)")
    s.add_argument("--run", required=True, help="the run directory (`legokit run --out`)")
    s.add_argument("--n", type=int, default=None, help="members per client (default: every example its steps reached)")
    s.add_argument("--nonmembers", type=int, default=200, help="non-members per client (default: %(default)s)")
    s.add_argument("--fpr", type=float, default=0.01, help="the FPR the TPR is read at (default: %(default)s)")
    s.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", default=None, help="the JSON file to write (default: RUN/audit.json)")
    s.set_defaults(func=_cmd_audit)

    from legokit.flower.cli import add_commands as add_flower_commands

    add_sweep_commands(sub)
    add_flower_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LegokitError as err:
        print(f"legokit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
