"""What every benchmark reports beside an absolute time: this machine's dense fp32 GEMM rate and its CPU model."""

from __future__ import annotations

import time

import torch


def gemm_gflops(size: int = 2048, repeat: int = 10) -> float:
    """Dense fp32 GEMM rate of this machine (GFLOP/s), the best of ``repeat`` timed products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def cpu_model() -> str:
    """This machine's CPU model name (``/proc/cpuinfo``), or the platform's processor string elsewhere."""
    import platform

    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
