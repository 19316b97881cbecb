"""How far float32 kernels move the pinned losses, against how far a real change of algorithm moves them.

``tests/test_pinned.py`` compares per-round training losses with losses recorded on another machine, so its
tolerance must sit above the spread that other CPUs' float32 kernels give (GEMM reductions in another order,
amplified by Adam over the rounds) and far below what a change of algorithm gives. This script runs every pinned
federation in a fresh process under each kernel variant this CPU can emulate, then under a few real changes,
and prints the largest relative deviation from the pinned losses for each:

    python bench/pin_spread.py               # tiny-llama conditions and the quick demo
    python bench/pin_spread.py --only tiny   # tiny-llama only (a minute)
    python bench/pin_spread.py --json out.json

Kernel variants: ``ATEN_CPU_CAPABILITY`` (PyTorch's own vectorised kernels), ``MKL_CBWR`` (MKL's code path for
GEMM: SSE4.2 / AVX / AVX2 / AVX-512, each a different reduction order), ``ONEDNN_MAX_CPU_ISA``, and one thread
instead of the machine's count. A variant that the CPU lacks (``MKL_CBWR=AVX512`` on an AVX2 CPU) falls back
to the CPU's own path; the table says which variants gave identical losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

# name -> environment variables set for the child process
KERNELS: dict[str, dict[str, str]] = {
    "this machine": {},
    "ATEN default": {"ATEN_CPU_CAPABILITY": "default"},
    "ATEN avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "MKL sse4_2": {"MKL_CBWR": "SSE4_2"},
    "MKL avx": {"MKL_CBWR": "AVX"},
    "MKL avx2": {"MKL_CBWR": "AVX2"},
    "MKL avx512": {"MKL_CBWR": "AVX512"},
    "oneDNN avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "1 thread": {"LEGOKIT_PIN_THREADS": "1"},
    "ATEN default + MKL sse4_2 + 1 thread": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "SSE4_2",
                                             "LEGOKIT_PIN_THREADS": "1"},
}
# The quick demo takes minutes a run: the variants that gave distinct losses on tiny-llama.
QUICK_KERNELS = ["this machine", "ATEN default", "MKL sse4_2", "1 thread", "ATEN default + MKL sse4_2 + 1 thread"]


def _changes(which: str) -> dict[str, dict]:
    steps, lr = (3, 0.01) if which != "quick" else (6, 0.0005)
    out = {"fedavg_delta instead of heteagg": {"fed.aggregator": "fedavg_delta"},
           "one local step fewer": {"train.local_steps": steps - 1},
           "lr x 1.1": {"train.lr": lr * 1.1}}
    if which == "quick":
        out.pop("fedavg_delta instead of heteagg")  # one run is minutes; the tiny runs show this one
    if which not in ("quick", "heteagg-adapter", "heteagg-merge"):
        out.pop("fedavg_delta instead of heteagg")  # local / centralized / flexlora: the aggregator is the condition
    return out


def _child(which: str, overrides: dict | None) -> list:
    """Run in a fresh process (the kernel variables are read at import) and return the losses."""
    import torch

    from legokit.utils import seed_everything

    if os.environ.get("LEGOKIT_PIN_THREADS"):
        torch.set_num_threads(int(os.environ["LEGOKIT_PIN_THREADS"]))
    seed_everything(0)
    import pinned_runs

    return pinned_runs.run(which, overrides)


def _spawn(which: str, env: dict[str, str], overrides: dict | None) -> list:
    cmd = [sys.executable, __file__, "--child", which, "--overrides", json.dumps(overrides or {})]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{which} {env} {overrides}: child failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["tiny", "quick"], default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, json.loads(args.overrides) or None)))
        return

    import platform

    import torch
    from machine import gemm_gflops
    from pinned_runs import TINY_CONDITIONS, max_rel_deviation, pinned

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    print(f"# {cpu}; avx512f={'avx512f' in flags} avx2={'avx2' in flags}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; fp32 GEMM {gemm_gflops():.1f} GFLOP/s", flush=True)
    runs = {"tiny": TINY_CONDITIONS, "quick": ["quick"]}
    which_all = [w for k, ws in runs.items() if args.only in (None, k) for w in ws]
    report: dict = {"cpu": cpu, "avx512f": "avx512f" in flags, "kernels": {}, "changes": {}}
    for which in which_all:
        want = pinned(which)
        seen: dict[str, list] = {}
        for name, env in KERNELS.items():
            if which == "quick" and name not in QUICK_KERNELS:
                continue
            got = _spawn(which, env, None)
            dev = max_rel_deviation(got, want)
            same = next((k for k, v in seen.items() if v == got), None)
            seen[name] = got
            report["kernels"].setdefault(which, {})[name] = dev
            print(f"{which:22s} kernel  {name:38s} max rel dev {dev:.2e}"
                  + (f"  (identical to {same})" if same else ""), flush=True)
        for name, overrides in _changes(which).items():
            got = _spawn(which, {}, overrides)
            # another number of steps: compare the steps both runs have
            dev = max(abs(a - b) / abs(b) for (_, _, ga), (_, _, wa) in zip(got, want, strict=True)
                      for a, b in zip(ga, wa, strict=False))
            report["changes"].setdefault(which, {})[name] = dev
            print(f"{which:22s} change  {name:38s} max rel dev {dev:.2e}", flush=True)
    spread = max(v for d in report["kernels"].values() for v in d.values())
    change = min(v for d in report["changes"].values() for v in d.values())
    print(f"# largest kernel spread {spread:.2e}; smallest real change {change:.2e}; ratio {change / spread:.0f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
