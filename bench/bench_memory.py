"""Memory of a federation: blocks as views of the LLM against blocks that copy its weights, 4 to 64 clients.

Every measurement runs in its own process (peak RSS is per process: ``ru_maxrss`` at its end) on the quick
profile's model, blocks and data (``configs/quick.yaml``: Wanda blocks at 0/25/50/75%, four tasks), with
``N`` clients over the four sparsity profiles (client k holds block k mod 4), a Dirichlet partition
(alpha 0.5) of 512 training examples (the same for every N), and rounds that sample 4 clients each
(``fed.sample_fraction = 4 / N``):

  design   ``view``: a block's SLM computes with the LLM's weights and its mask (``legokit.slm.LinearView``);
           ``copy``: the SLM holds its own pruned copy of every linear weight (the design before views).
  clients  4, 16, 64.

Reported per run: peak RSS as a multiple of the LLM's float32 size, and seconds per round. Then the LoRA
step time of a view block against a copied block (the 50% block, masked LoRA, the quick training sizes,
interleaved repeats, best of each), and this machine's fp32 GEMM rate from the same run. With ``--flower-sim N``:
the same federation of N clients in Flower's simulation engine (``legokit.flower.simulation.simulate``, N virtual
SuperNodes, the same blocks read from disk) against the in-process view run, peak RSS and seconds.

With ``--heaps PROFILE`` instead: the process's floor (resident memory after the imports, and with the tokenizer
and the LLM loaded and paged in), then ``legokit run --config PROFILE`` twice in fresh processes, with glibc's
default heap and with ``--lean-memory`` (``legokit.utils.lean_heap``): peak RSS, seconds, and a check that both
runs wrote the same results.

Run:  .venv/bin/python bench/bench_memory.py [--clients 4 16 64] [--rounds 1] [--steps 2] [--flower-sim 16]
      .venv/bin/python bench/bench_memory.py --heaps quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from machine import gemm_gflops  # noqa: E402


def _config(clients: int, rounds: int, steps: int):
    from legokit.config import load_config

    return load_config(ROOT / "configs" / "quick.yaml").with_overrides({
        "fed.num_clients": clients, "fed.client_sparsities": None, "fed.rounds": rounds, "fed.global_rank": 32,
        "fed.sample_fraction": min(1.0, 4 / clients), "data.partition": "dirichlet", "data.alpha": 0.5,
        "data.train_examples": 512,
        "train.local_steps": steps, "eval.base": False})


def child_federation(design: str, clients: int, rounds: int, steps: int, blocks_dir: Path) -> dict:
    """One federation in this process; returns its peak RSS and seconds per round."""
    from legokit.blocks import Block
    from legokit.experiment import client_partitions, load_or_extract_blocks
    from legokit.federation import run_federation
    from legokit.models import load_model, param_bytes

    cfg = _config(clients, rounds, steps)
    llm, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    parts = client_partitions(cfg)
    index = blocks_dir / "blocks" / "index.json"
    if not index.is_file():  # the first run extracts, every run reads them with its design
        load_or_extract_blocks(cfg, llm, tok, blocks_dir, progress=False)
    n = len(json.loads(index.read_text())["blocks"])
    blocks = [Block.load(blocks_dir / "blocks" / f"{i}", llm, view=design == "view") for i in range(n)]
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        run_federation(cfg, llm, tok, blocks, parts, out, progress=False)
        seconds = (time.perf_counter() - t) / rounds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"design": design, "clients": clients, "peak_mib": peak / 2**20, "llm_mib": param_bytes(llm) / 2**20,
            "seconds_per_round": seconds}


def child_step_time(steps: int, repeats: int, blocks_dir: Path) -> dict:
    """LoRA training step time of the 50% block built as views and as copies (interleaved, best of each)."""
    from legokit.experiment import client_partitions, load_or_extract_blocks
    from legokit.lora import attach_lora, detach_lora
    from legokit.models import load_model
    from legokit.slm import build_slm
    from legokit.train import train_client

    cfg = _config(4, 1, steps)
    llm, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    block = load_or_extract_blocks(cfg, llm, tok, blocks_dir, progress=False)[2]
    examples = client_partitions(cfg)[0]
    best = {"view": float("inf"), "copy": float("inf")}
    for _ in range(repeats):
        for design in best:
            model = build_slm(block, view=design == "view")
            attach_lora(model, cfg.lora, masks=block.masks, seed=0)
            train_client(model, tok, examples, replace(cfg.train, local_steps=1), seed=0, progress=False)  # warm-up
            t = time.perf_counter()
            train_client(model, tok, examples, cfg.train, seed=0, progress=False)
            best[design] = min(best[design], (time.perf_counter() - t) / steps)
            detach_lora(model)
            del model
    return {"block": block.id, "view_s": best["view"], "copy_s": best["copy"]}


def child_simulation(clients: int, rounds: int, steps: int, blocks_dir: Path) -> dict:
    """The same federation in Flower's simulation engine, in this process; its peak RSS and seconds per round."""
    import shutil

    from legokit.flower.simulation import simulate
    from legokit.models import load_model, param_bytes

    cfg = _config(clients, rounds, steps)
    with tempfile.TemporaryDirectory() as out:
        shutil.copytree(blocks_dir / "blocks", Path(out) / "blocks")  # the ServerApp reads them, as the view run does
        t = time.perf_counter()
        res = simulate(cfg, out)
        seconds = (time.perf_counter() - t) / rounds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    llm, _ = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    return {"design": f"flower-sim ({res['backend']})", "clients": clients, "peak_mib": peak / 2**20,
            "llm_mib": param_bytes(llm) / 2**20, "seconds_per_round": seconds}


def child_floor(model: str) -> dict:
    """Resident memory before any LEGO work: the runtime's imports, the tokenizer, the LLM paged in (the model's
    own ``load_model`` loads a second tokenizer object; the first is dropped)."""
    import re

    def rss() -> float:
        roll = open("/proc/self/smaps_rollup").read()
        return int(re.search(r"^Rss:\s+(\d+) kB", roll, re.M).group(1)) / 1024

    import torch
    from transformers import AutoTokenizer

    import legokit.experiment  # noqa: F401  (transformers and the library)
    from legokit.models import _checkpoint_path, load_model, param_bytes
    from legokit.utils import release_heap

    steps = {"imports": rss()}
    tok = AutoTokenizer.from_pretrained(_checkpoint_path(model))
    steps["tokenizer"] = rss()
    del tok
    llm, tok = load_model(model)
    with torch.no_grad():
        for p in llm.parameters():  # touch every weight page (they are mapped from the checkpoint file)
            p.sum()
    release_heap()
    steps["+ LLM"] = rss()
    return {"steps": steps, "llm_mib": param_bytes(llm) / 2**20}


def run_profile(profile: str, lean: bool) -> dict:
    """``legokit run --config PROFILE`` in a fresh process; its results.json (peak RSS, seconds, scores)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(Path(sys.executable).with_name("legokit")), "run", "--config", profile, "--out", out]
        env = {**os.environ, "LEGOKIT_PROGRESS": "0"}
        done = subprocess.run(cmd + ["--lean-memory"] * lean, capture_output=True, text=True, cwd=ROOT, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        return json.loads((Path(out) / "results.json").read_text())


def _scores(results):
    """A run's results without what measures the machine (seconds and speeds, memory, heap mode), at any depth."""
    if isinstance(results, dict):
        return {k: _scores(v) for k, v in results.items()
                if "second" not in k and k not in ("peak_rss_mb", "heap")}
    if isinstance(results, list):
        return [_scores(v) for v in results]
    return results


def compare_heaps(profile: str) -> None:
    """The floor, then ``legokit run`` on ``profile`` with glibc's default heap and with ``--lean-memory``."""
    floor = _run_child(["floor", "smollm2-135m-instruct"])
    llm = floor["llm_mib"]
    last = 0.0
    print(f"floor (one process, before any LEGO work; the LLM's fp32 size is {llm:.0f} MiB):")
    for step, mib in floor["steps"].items():
        print(f"  {step:16s} {mib:7.0f} MiB = {mib / llm:.2f}x  (+{mib - last:.0f} MiB)")
        last = mib
    runs = {}
    for lean in (False, True):
        r = runs[lean] = run_profile(profile, lean)
        s = r["seconds"]
        print(f"legokit run --config {profile}{' --lean-memory' * lean}: peak RSS {r['peak_rss_mb']:.0f} MiB = "
              f"{r['peak_rss_mb'] / llm:.2f}x (the floor + {(r['peak_rss_mb'] - last) / llm:.2f}x); "
              f"{s['total']:.0f} s total, federation {s.get('federation', float('nan')):.0f} s", flush=True)
    same = _scores(runs[False]) == _scores(runs[True])
    print(f"lean / default: peak {runs[True]['peak_rss_mb'] / runs[False]['peak_rss_mb']:.3f}, "
          f"time {runs[True]['seconds']['total'] / runs[False]['seconds']['total']:.3f}; "
          f"results identical: {same}")
    if not same:
        raise SystemExit("the lean heap changed a result: it must only change where memory comes from")


def _run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="local steps per client per round")
    ap.add_argument("--step-repeats", type=int, default=3)
    ap.add_argument("--flower-sim", type=int, default=None, metavar="N",
                    help="also run N clients in Flower's simulation engine against the in-process view run")
    ap.add_argument("--heaps", metavar="PROFILE", default=None,
                    help="instead: the process floor, then `legokit run --config PROFILE` with the default heap "
                         "and with --lean-memory (peak RSS, seconds, identical results)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    blocks_dir = Path(tempfile.gettempdir()) / "legokit-bench-memory-blocks"
    if args.child:
        kind, *rest = args.child
        if kind == "fed":
            res = child_federation(rest[0], int(rest[1]), args.rounds, args.steps, blocks_dir)
        elif kind == "floor":
            res = child_floor(rest[0])
        elif kind == "sim":
            res = child_simulation(int(rest[0]), args.rounds, args.steps, blocks_dir)
        else:
            res = child_step_time(args.steps, args.step_repeats, blocks_dir)
        print(json.dumps(res))
        return

    gflops = gemm_gflops()
    if args.heaps:
        print(f"fp32 GEMM: {gflops:.1f} GFLOP/s")
        compare_heaps(args.heaps)
        return
    print(f"fp32 GEMM: {gflops:.1f} GFLOP/s; quick profile, {args.rounds} round(s) of {args.steps} local steps, "
          f"4 clients sampled per round")
    rows = []
    for design in ("copy", "view"):
        for n in args.clients:
            r = _run_child(["fed", design, str(n)])
            rows.append(r)
            ratio = r["peak_mib"] / r["llm_mib"]
            print(f"  {design:4s} {n:3d} clients: peak RSS {r['peak_mib']:7.0f} MiB = {ratio:.2f}x the LLM's fp32 "
                  f"size ({r['llm_mib']:.0f} MiB); {r['seconds_per_round']:6.1f} s per round", flush=True)
    step = _run_child(["step"])
    print(f"\n{'design':6s} " + " ".join(f"{n:>14d} clients" for n in args.clients))
    for design in ("copy", "view"):
        cells = [r for r in rows if r["design"] == design]
        print(f"{design:6s} " + " ".join(f"{r['peak_mib'] / r['llm_mib']:>6.2f}x {r['seconds_per_round']:>6.1f} s/rd"
                                         for r in cells))
    by = {(r["design"], r["clients"]): r for r in rows}
    lo, hi = min(args.clients), max(args.clients)
    for design in ("copy", "view"):
        print(f"{design}: peak RSS at {hi} clients / at {lo} clients = "
              f"{by[design, hi]['peak_mib'] / by[design, lo]['peak_mib']:.3f}")
    for n in args.clients:
        print(f"{n} clients: view peak / copy peak = {by['view', n]['peak_mib'] / by['copy', n]['peak_mib']:.3f}")
    print(f"LoRA step on {step['block']}: view {step['view_s']:.2f} s, copy {step['copy_s']:.2f} s, "
          f"ratio view/copy = {step['view_s'] / step['copy_s']:.3f}")
    if args.flower_sim:
        n = args.flower_sim
        inproc = by.get(("view", n)) or _run_child(["fed", "view", str(n)])
        sim = _run_child(["sim", str(n)])
        ratio = sim["peak_mib"] / sim["llm_mib"]
        print(f"{n} clients, {sim['design']}: peak RSS {sim['peak_mib']:.0f} MiB = {ratio:.2f}x, "
              f"{sim['seconds_per_round']:.1f} s per round; in-process view {inproc['peak_mib']:.0f} MiB, "
              f"{inproc['seconds_per_round']:.1f} s per round; simulation / in-process peak = "
              f"{sim['peak_mib'] / inproc['peak_mib']:.3f}")


if __name__ == "__main__":
    main()
