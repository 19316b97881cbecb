"""Per-round overhead of Flower's deployment engine over the in-process loop, on tiny-llama.

The same experiment (tiny-llama, 2 clients, small LoRA and 2 local steps) runs three ways:

  in-process   ``legokit.federation.run_federation`` (the baseline)
  simulation   Flower's simulation engine (``legokit.flower.simulation.simulate``; Ray if installed, else in-process
               backend): Flower's runtime, messages and strategy, no processes
  deployment   a real SuperLink and one SuperNode per client on 127.0.0.1 (``legokit.flower.deployment.deploy``);
               every round spawns a ClientApp process per client (Flower's process isolation)

A round's time is measured the same way in each: from configuring the round to its checkpoint being written
(``rounds.jsonl`` "seconds"); model loading, block extraction, SuperNode discovery and process start-up are
reported apart. The ratio is median deployment round / median in-process round. Also printed: the payload
bytes per round (adapter factors down and up) and the SuperLink's own traffic count for the whole run, and the
max |ΔW| difference between the Flower runs' final global adapter and the in-process one.

Run:  LEGOKIT_CACHE=/work/cache .venv/bin/python bench/bench_flower.py [--rounds 3] [--clients 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from legokit.config import ExperimentConfig


def config(clients: int, rounds: int) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "name": "bench-flower", "model": "tiny-llama", "device": "cpu",
        "prune": {"sparsities": [0.0, 0.5], "n_calib": 4, "seq_len": 32},
        "lora": {"rank": 2, "alpha": 4.0},
        "train": {"local_steps": 2, "batch_size": 2, "max_len": 64, "lr": 0.01},
        "fed": {"num_clients": clients, "rounds": rounds},
        "data": {"tasks": ["boolq", "asdiv"], "train_examples": 4 * clients},
        "eval": {"base": False, "blocks": False},
    })


def rounds_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x.strip()]


def final_delta(run_dir: Path, rounds: int) -> dict[str, torch.Tensor]:
    from legokit.adapters import load_peft_adapter

    factors, alpha = load_peft_adapter(run_dir / "adapters" / f"round_{rounds:03d}")
    r = next(iter(factors.values()))[0].shape[0]
    return {n: (alpha / r) * (b @ a) for n, (a, b) in factors.items()}


def with_blocks(run_dir: Path, blocks_from: Path) -> Path:
    """A new run directory holding a copy of the shared blocks (every engine prunes nothing itself)."""
    run_dir.mkdir(parents=True)
    shutil.copytree(blocks_from / "blocks", run_dir / "blocks")
    return run_dir


def in_process(cfg: ExperimentConfig, run_dir: Path, blocks_from: Path) -> float:
    from legokit.experiment import client_partitions, load_or_extract_blocks
    from legokit.federation import run_federation
    from legokit.models import load_model

    t0 = time.time()
    with_blocks(run_dir, blocks_from)
    llm, tok = load_model(cfg.model, device=cfg.device)
    blocks = load_or_extract_blocks(cfg, llm, tok, run_dir, progress=False)
    run_federation(cfg, llm, tok, blocks, client_partitions(cfg), run_dir, progress=False)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of every engine's training (in-process, simulation, each ClientApp)")
    ap.add_argument("--skip-sim", action="store_true")
    args = ap.parse_args()

    from legokit.flower.deployment import deploy
    from legokit.flower.simulation import simulate

    cfg = config(args.clients, args.rounds)
    torch.set_num_threads(args.threads)  # the in-process and simulation runs; deploy() sets the ClientApps'

    tmp = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    try:
        from legokit.experiment import load_or_extract_blocks
        from legokit.models import load_model

        llm, tok = load_model(cfg.model, device=cfg.device)
        (tmp / "src").mkdir()
        load_or_extract_blocks(cfg, llm, tok, tmp / "src", progress=False)
        # In-process before and after the Flower runs; the faster one is the baseline (a busy machine only
        # ever slows a run down).
        ref_total = in_process(cfg, tmp / "ref", tmp / "src")
        sim = None
        if not args.skip_sim:
            t0 = time.time()
            sim = simulate(cfg, with_blocks(tmp / "sim", tmp / "src"))
            sim_total = time.time() - t0
        t0 = time.time()
        dep = deploy(cfg, with_blocks(tmp / "deploy", tmp / "src"), round_timeout=600, timeout=1800,
                     threads=args.threads, env={"OMP_NUM_THREADS": str(args.threads)})
        dep_total = time.time() - t0
        ref2_total = in_process(cfg, tmp / "ref2", tmp / "src")
        if statistics.median(r["seconds"] for r in rounds_of(tmp / "ref2")) < \
                statistics.median(r["seconds"] for r in rounds_of(tmp / "ref")):
            shutil.rmtree(tmp / "ref")
            (tmp / "ref2").rename(tmp / "ref")
            ref_total = ref2_total

        ref_r = [r["seconds"] for r in rounds_of(tmp / "ref")]
        dep_r = [r["seconds"] for r in rounds_of(tmp / "deploy")]
        ref_delta = final_delta(tmp / "ref", args.rounds)
        diff = {"deployment": max(float((final_delta(tmp / "deploy", args.rounds)[n] - d).abs().max())
                                  for n, d in ref_delta.items())}
        rows = [("in-process", ref_r, ref_total), ("deployment", dep_r, dep_total)]
        if sim is not None:
            sim_r = [r["seconds"] for r in rounds_of(tmp / "sim")]
            rows.insert(1, (f"simulation ({sim['backend']})", sim_r, sim_total))
            diff["simulation"] = max(float((final_delta(tmp / "sim", args.rounds)[n] - d).abs().max())
                                     for n, d in ref_delta.items())
        base = statistics.median(ref_r)
        print(f"tiny-llama, {args.clients} clients, {args.rounds} rounds, 2 local steps, rank 2 "
              f"(global rank {2 * args.clients})\n")
        print(f"{'engine':24s} {'median round s':>15s} {'rounds s':>24s} {'whole run s':>12s} {'ratio':>7s}")
        for name, per_round, total in rows:
            print(f"{name:24s} {statistics.median(per_round):15.2f} {str([round(x, 1) for x in per_round]):>24s} "
                  f"{total:12.1f} {statistics.median(per_round) / base:7.1f}x")
        lines = [json.loads(x) for x in (tmp / "deploy" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        train_s = statistics.median(m["seconds"] for m in lines)
        proc_s = statistics.median(m["clientapp_process_seconds"] for m in lines)
        print(f"\ndeployment round, median: {statistics.median(dep_r):.1f} s = ClientApp process {proc_s:.1f} s "
              f"(of which local_update {train_s:.1f} s, the rest interpreter + imports + model + block + data) "
              f"+ {statistics.median(dep_r) - proc_s:.1f} s Flower messaging (SuperNode poll every 3 s, "
              f"SuperExec task poll, object push/pull) and aggregation")
        print(f"load average during the bench: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print("\nbytes per round (adapter payload, float32 arrays as Flower serialises them):")
        for r in rounds_of(tmp / "deploy"):
            print(f"  round {r['round']}: {r['bytes_down']} B down, {r['bytes_up']} B up")
        traffic = dep["flower"].get("network-traffic", {})
        print(f"SuperLink traffic for the whole deployment run (incl. discovery and framing): "
              f"{traffic.get('inbound-bytes')} B in, {traffic.get('outbound-bytes')} B out")
        print("max |ΔW_flower - ΔW_in-process| of the final global adapter: "
              + ", ".join(f"{k} {v:.3g}" for k, v in diff.items()))
        result = {"ratio_deployment_over_in_process": statistics.median(dep_r) / base,
                  "clientapp_process_s": proc_s, "local_update_s": train_s,
                  "median_round_s": {name: statistics.median(x) for name, x, _ in rows},
                  "bytes_per_round": [(r["bytes_down"], r["bytes_up"]) for r in rounds_of(tmp / "deploy")],
                  "flower_traffic": traffic, "max_abs_diff": diff}
        print("\n" + json.dumps(result))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
