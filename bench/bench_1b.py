"""LEGO at 1B parameters on CPU: one federated round on a random Llama of TinyLlama-1.1B's shape.

The LLM is built from a config (no download): random float32 weights, initialised in place after a ``meta``
build, so no second copy ever exists. Its vocabulary is the default LLM's tokenizer (49152 tokens, from the
cache), so the clients train on the real task data; the embeddings are tied, as in that family. Everything after
the LLM is legokit's own path: magnitude blocks at 0/25/50/75% (``blocks.extract_blocks``: packed masks, the SLMs
as unstructured views of the LLM), ``federation.build_federation`` with masked LoRA under gradient checkpointing,
HeteAgg, and the adapter broadcast at ``fed.global_rank`` 32.

Scenarios (each in its own process: peak RSS is per process):
  4   configs/quick.yaml's federation: 4 clients on the blocks at 0/25/50/75%, one task each, all sampled;
  64  configs/clients64.yaml's: 64 clients, client k on the block of level k mod 4 (one block per level, shared),
      a Dirichlet partition, 8 clients sampled.
Both with magnitude pruning, 1 round of 2 local steps.

Reported per scenario: the LLM's parameters and float32 bytes; peak RSS (``VmHWM``) as a multiple of those bytes
(target <= 1.5x); the floor (resident memory after the imports and the tokenizer, before the LLM, as
``bench_memory.py --heaps`` measures it); the resident peak of every phase (a thread samples ``VmRSS``; torch's
allocations are invisible to tracemalloc); each client's seconds per local step and tokens per step against the
4·N FLOP/token limit (N = non-embedding parameters) at this run's fp32 GEMM rate (best of a measurement before
and after the round); the CPU model. The JSON goes to ``--out``.

Run:  .venv/bin/python bench/bench_1b.py [--shape 1b|100m|tiny] [--clients 4 64] [--lean-memory] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

# (hidden, layers, heads, kv heads, intermediate): TinyLlama-1.1B's shape, and smaller ones to develop on
SHAPES = {"1b": (2048, 22, 32, 4, 5632), "100m": (768, 12, 12, 4, 2048), "tiny": (256, 4, 8, 2, 688)}
SCENARIOS = {4: "quick.yaml", 64: "clients64.yaml"}


def rss_status() -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` of this process in MiB (/proc/self/status)."""
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, kb = line.split()[:2]
            out[key[:-1]] = int(kb) / 1024
    return out


class PhaseSampler:
    """Samples ``VmRSS`` every ``interval`` seconds in a thread and keeps the highest value per named phase."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.phase, self.peaks, self.seconds = interval, "start", {}, {}
        self._t = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        mib = rss_status()["VmRSS"]
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), mib)

    def enter(self, phase: str) -> None:
        """End the current phase (one last sample, its seconds; a line on stderr) and start ``phase``."""
        self._sample()
        now = time.perf_counter()
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self._t
        print(f"[bench_1b] {self.phase}: peak RSS {self.peaks[self.phase]:.0f} MiB, {now - self._t:.1f} s",
              file=sys.stderr, flush=True)
        self.phase, self._t = phase, now
        self._sample()

    def stop(self) -> None:
        self.enter("end")
        self._stop.set()
        self._thread.join()


def build_llm(shape: str, vocab: int, tokenizer, seed: int = 0):
    """A random Llama of ``SHAPES[shape]`` with tied embeddings: built on ``meta``, each tensor allocated once
    and initialised in place (normal, std 0.02; norms 1), the rotary buffers computed for real."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.lm_head.weight = None  # tied: to_empty would allocate the embedding a second time for the head
    model.to_empty(device="cpu")
    model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=config)  # its inv_freq buffers were left uninitialised
    model.name_or_path = f"random-llama-{shape}"
    return model.eval()


def _config(clients: int, steps: int):
    from legokit.config import load_config

    return load_config(ROOT / "configs" / SCENARIOS[clients]).with_overrides({
        "name": f"bench-1b-{clients}", "prune.method": "magnitude", "fed.rounds": 1, "fed.global_rank": 32,
        "train.local_steps": steps, "train.gradient_checkpointing": True, "eval.base": False})


def child(shape: str, clients: int, steps: int, lean: bool, threads: int) -> dict:
    """One scenario in this process: build, extract, one round; memory by phase, step times, the GEMM rate."""
    sampler = PhaseSampler()
    sampler.enter("imports")
    import torch
    from bench_train import non_embedding_params
    from machine import cpu_model, gemm_gflops
    from transformers import AutoTokenizer

    from legokit.blocks import extract_blocks
    from legokit.experiment import client_partitions
    from legokit.federation import Exchange, build_federation
    from legokit.models import _checkpoint_path, param_bytes
    from legokit.utils import lean_heap, release_heap

    if threads:
        torch.set_num_threads(threads)
    if lean:
        lean_heap()
    cfg = _config(clients, steps)
    sampler.enter("tokenizer")
    tok = AutoTokenizer.from_pretrained(_checkpoint_path(cfg.model))
    release_heap()
    floor = rss_status()["VmRSS"]
    gflops = [gemm_gflops()]
    sampler.enter("LLM (random, built in place)")
    llm = build_llm(shape, len(tok), tok, seed=cfg.seed)
    llm_mib = param_bytes(llm) / 2**20
    sampler.enter("data")
    parts = client_partitions(cfg)
    sampler.enter("blocks (magnitude, packed masks)")
    p = cfg.prune
    blocks = extract_blocks(llm, tok, sparsities=tuple(p.sparsities), method=p.method, pattern=p.pattern,
                            seed=cfg.seed, progress=False)
    release_heap()
    sampler.enter("federation built")
    with tempfile.TemporaryDirectory() as run_dir:
        fed = build_federation(cfg, llm, tok, blocks, parts, run_dir, progress=False)
        inner = fed.clients

        def phased(tasks):  # the same runner, one task at a time, each its own phase
            outcomes = []
            for t in tasks:
                sampler.enter(f"client {t.client} ({blocks[t.block].id})")
                outcomes += inner([t]).outcomes
            sampler.enter("aggregate (HeteAgg) + broadcast (SVD) + checkpoint")
            return Exchange(outcomes)

        fed.clients = phased
        record = fed.step()
    sampler.stop()
    gflops.append(gemm_gflops())
    failed = [ln for ln in record.lines if ln["status"] != "ok"]
    if failed:
        raise SystemExit(f"clients failed: {failed[0].get('error')}\n{failed[0].get('traceback', '')}")
    n = non_embedding_params(llm)
    rate = max(gflops) * 1e9
    steps_out = []
    for ln in record.lines:
        sec = ln["tokens"] / ln["tokens_per_second"] / ln["steps"]
        tps = ln["tokens"] / ln["steps"]
        steps_out.append({"client": ln["client"], "block": ln["block"], "seconds_per_step": sec,
                          "tokens_per_step": tps, "loss_first": ln["loss_first"],
                          "ratio_vs_4n": 4 * n * tps / sec / rate})
    st = rss_status()
    return {"shape": shape, "dims": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate"),
                                             SHAPES[shape], strict=True)),
            "vocab": len(tok), "clients": clients, "sampled": len(record.lines), "local_steps": steps,
            "lean_heap": lean, "params": sum(t.numel() for t in llm.parameters()), "non_embedding_params": n,
            "llm_fp32_mib": llm_mib, "peak_rss_mib": st["VmHWM"], "ratio": st["VmHWM"] / llm_mib,
            "floor_mib": floor, "floor_ratio": floor / llm_mib,
            "phases": [{"phase": k, "peak_rss_mib": v, "seconds": sampler.seconds.get(k, 0.0)}
                       for k, v in sampler.peaks.items()],
            "steps": steps_out, "gemm_gflops": max(gflops), "gemm_gflops_runs": gflops,
            "limit_4n_tokens_per_second": rate / (4 * n), "round_seconds": record.metrics["seconds"],
            "energy_kept_mean": record.metrics.get("energy_kept_mean"), "cpu": cpu_model(),
            "threads": torch.get_num_threads()}


def report(r: dict) -> None:
    llm = r["llm_fp32_mib"]
    head = [f"\n== {r['clients']} clients ({r['sampled']} sampled), shape {r['shape']} {r['dims']}, "
            f"vocab {r['vocab']}{', lean heap' if r['lean_heap'] else ''}",
            f"params {r['params'] / 1e9:.3f} B ({r['non_embedding_params'] / 1e9:.3f} B non-embedding); "
            f"LLM fp32 {llm:.0f} MiB",
            f"peak RSS {r['peak_rss_mib']:.0f} MiB = {r['ratio']:.2f}x the LLM's fp32 size (target <= 1.5x); "
            f"floor (imports + tokenizer) {r['floor_mib']:.0f} MiB = {r['floor_ratio']:.2f}x",
            f"{'phase':52s}{'peak RSS MiB':>13s}{'x LLM':>7s}{'seconds':>9s}"]
    print("\n".join(head))
    for ph in r["phases"]:
        print(f"{ph['phase']:52s}{ph['peak_rss_mib']:13.0f}{ph['peak_rss_mib'] / llm:7.2f}{ph['seconds']:9.1f}")
    print(f"GEMM {r['gemm_gflops']:.1f} GFLOP/s (runs {', '.join(f'{g:.1f}' for g in r['gemm_gflops_runs'])}); "
          f"4N limit {r['limit_4n_tokens_per_second']:.0f} tokens/s; {r['threads']} threads; CPU {r['cpu']}")
    print(f"{'client':>7s} {'block':28s}{'s/step':>8s}{'tokens/step':>13s}{'vs 4N':>8s}{'loss':>8s}")
    for s in r["steps"]:
        print(f"{s['client']:7d} {s['block']:28s}{s['seconds_per_step']:8.2f}{s['tokens_per_step']:13.0f}"
              f"{s['ratio_vs_4n']:8.1%}{s['loss_first']:8.3f}")
    print(f"round {r['round_seconds']:.1f} s; SVD energy kept (mean) {r['energy_kept_mean']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="1b: TinyLlama-1.1B's shape; 100m and "
                    "tiny to develop on")
    ap.add_argument("--clients", type=int, nargs="+", choices=sorted(SCENARIOS), default=sorted(SCENARIOS))
    ap.add_argument("--steps", type=int, default=2, help="local steps per client")
    ap.add_argument("--lean-memory", action="store_true", help="glibc maps large allocations one by one "
                    "(legokit.utils.lean_heap, as legokit run --lean-memory)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); on a busy "
                    "machine 1 avoids OpenMP threads waiting on each other")
    ap.add_argument("--out", type=Path, default=None, help="the JSON (default runs/bench_1b-<shape>.json)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if args.child:
        print(json.dumps(child(args.shape, args.clients[0], args.steps, args.lean_memory, args.threads)))
        return
    results = []
    for n in args.clients:
        cmd = [sys.executable, __file__, "--child", "--shape", args.shape, "--clients", str(n), "--steps",
               str(args.steps), "--threads", str(args.threads)] + ["--lean-memory"] * args.lean_memory
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT,  # its stderr: phases as they end
                              env={**os.environ, "LEGOKIT_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"})
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (its stderr is above)")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        report(results[-1])
        out = args.out or ROOT / "runs" / f"bench_1b-{args.shape}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")  # after each scenario
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
