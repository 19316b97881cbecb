"""GPU check: the device tests on CUDA, one LEGO round on the default LLM, and a repeatability check, all timed.

Written for a machine with an NVIDIA GPU (legokit's own machines and its CI have none). From the repository root,
after ``legokit setup``:

    .venv/bin/python bench/gpu_check.py                                   # CUDA, the default LLM
    .venv/bin/python bench/gpu_check.py --device cpu --model tiny-llama   # a quick smoke run anywhere

Steps (each timed; the whole report is printed and written to ``--out`` as JSON):

1. ``tests``: pytest on the unit tests that take the ``device`` fixture (``tests/test_slm.py``, ``test_lora.py``,
   ``test_train.py``, ``test_aggregate.py``), for this device only (``-k cuda``). On CUDA the masked LoRA test
   also fails if its forward or backward waits for the GPU (``torch.cuda.set_sync_debug_mode``).
2. ``round``: one round of the quick profile (``configs/quick.yaml``: 4 clients on Wanda blocks at 0/25/50/75%,
   masked LoRA, HeteAgg) on ``--model`` and ``--device`` in the dtype ``auto`` picks (a bfloat16 base with
   float32 LoRA factors and optimizer state on CUDA; float32 on the CPU): model load, block extraction, the
   round, each client's training time and tokens per second, the rest of the round (aggregation and
   broadcast), and the peak memory (GPU memory on CUDA, the
   process's peak RSS on the CPU).
3. ``repeat``: client 1's local training run twice from the same seed and the same start: are the factors
   bit-identical (``legokit.utils.deterministic_cuda``)?
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from legokit.client import local_update
from legokit.config import load_config
from legokit.experiment import client_partitions, load_or_extract_blocks
from legokit.federation import build_federation
from legokit.messages import initial_factors
from legokit.models import DEFAULT_MODEL, load_model, param_bytes
from legokit.utils import peak_rss_mb, resolve_device, seed_everything

ROOT = Path(__file__).resolve().parent.parent
DEVICE_TESTS = ["tests/test_slm.py", "tests/test_lora.py", "tests/test_train.py", "tests/test_aggregate.py"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_tests(device: torch.device) -> dict:
    """The device-parametrized unit tests, for ``device`` only; pytest's summary line and exit status."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", device.type,
                           *DEVICE_TESTS], cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " error" in ln),
                   lines[-1] if lines else proc.stderr.strip()[-500:])
    out = {"exit_status": proc.returncode, "summary": summary.strip("= "), "seconds": round(time.perf_counter() - t, 1)}
    if proc.returncode:
        out["output_tail"] = proc.stdout[-4000:] + proc.stderr[-2000:]
    return out


def run_round(model: str, device: str, steps: int | None) -> dict:
    """One quick-profile round on ``model``: timings, per-client training, peak memory, repeatability."""
    overrides = [f"model={model}", f"device={device}", "fed.rounds=1"]
    if steps is not None:
        overrides.append(f"train.local_steps={steps}")
    cfg = load_config("quick", overrides)
    dev = resolve_device(cfg.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seed_everything(cfg.seed)
    timings = {}
    t = time.perf_counter()
    llm, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    _sync(dev)
    timings["load"] = time.perf_counter() - t
    partitions = client_partitions(cfg)
    with tempfile.TemporaryDirectory(prefix="legokit-gpu-check-") as tmp:
        t = time.perf_counter()
        blocks = load_or_extract_blocks(cfg, llm, tok, Path(tmp), progress=False)
        _sync(dev)
        timings["extract"] = time.perf_counter() - t
        fed = build_federation(cfg, llm, tok, blocks, partitions, tmp, progress=False)
        t = time.perf_counter()
        record = fed.step()
        _sync(dev)
        timings["round"] = time.perf_counter() - t
        clients = [{k: line.get(k) for k in ("client", "block", "status", "steps", "tokens", "seconds",
                                               "tokens_per_second", "loss_first", "loss_last", "error")
                    if line.get(k) is not None} for line in record.lines]
        repeat = _repeat(cfg, llm, tok, blocks, partitions, dev)
    out = {"model": cfg.model, "device": str(dev), "dtype": str(next(llm.parameters()).dtype),
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "llm_mib": round(param_bytes(llm) / 2**20, 1), "local_steps": cfg.train.local_steps,
           "seconds": {k: round(v, 2) for k, v in timings.items()}, "clients": clients,
           "aggregate_broadcast_seconds": round(timings["round"] - sum(c.get("seconds", 0.0) for c in clients), 2),
           "repeat": repeat}
    if dev.type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    out["peak_rss_mib"] = round(peak_rss_mb(), 1)
    return out


def _repeat(cfg, llm, tok, blocks, partitions, dev: torch.device) -> dict:
    """Client 1's local training twice from the same seed and start: bit-identical factors?"""
    init = initial_factors(llm, cfg.lora, seed=cfg.seed)
    scaling = cfg.lora.alpha / cfg.lora.rank
    runs = [local_update(cfg, blocks[1], tok, partitions[1], init, scaling, client=1, rnd=1, device=dev,
                         progress=False) for _ in range(2)]
    a, b = (r.factors for r in runs)
    diff = max(float((x - y).abs().max()) for n in a for x, y in zip(a[n], b[n], strict=True))
    return {"identical": diff == 0.0, "max_abs_difference": diff,
            "losses": [r.metrics["losses"] for r in runs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu or auto")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the LLM of the round (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="local steps per client (default: the quick profile's)")
    p.add_argument("--no-tests", action="store_true", help="skip the unit tests")
    p.add_argument("--out", default="gpu_check.json", help="the JSON report (default: %(default)s)")
    args = p.parse_args(argv)
    dev = resolve_device(args.device)  # a clear error for cuda without CUDA, before any work
    report = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if not args.no_tests:
        report["tests"] = run_tests(dev)
        print("tests:", report["tests"]["summary"], flush=True)
    report["round"] = run_round(args.model, str(dev), args.steps)
    text = json.dumps(report, indent=1)
    print(text)
    Path(args.out).write_text(text + "\n")
    return 1 if report.get("tests", {}).get("exit_status") else 0


if __name__ == "__main__":
    sys.exit(main())
