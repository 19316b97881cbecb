"""Small shared helpers: cache location, seeds, device and precision, atomic file writes.

Nothing here runs on import; callers ask for each effect explicitly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class LegokitError(ValueError):
    """A user-facing error: the message names the bad value and the fix."""


def cache_dir() -> Path:
    """Root of legokit's asset cache: ``$LEGOKIT_CACHE`` or ``~/.cache/legokit``."""
    env = os.environ.get("LEGOKIT_CACHE")
    root = Path(env or os.path.join(os.path.expanduser("~"), ".cache", "legokit"))
    # A file where the cache (or one of its parents) should be fails later inside mkdir or open with an OS
    # traceback that names neither the variable nor the fix.
    blocker = next((p for p in (root, *root.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        what = f"LEGOKIT_CACHE={env!r}" if env else f"the default cache {str(root)!r}"
        raise LegokitError(f"{what} cannot be legokit's cache directory: {str(blocker)!r} is a file; point "
                           "LEGOKIT_CACHE at a directory (created if missing) or move the file away")
    return root


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; any other string is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise LegokitError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'") from err
    # torch.device accepts any known type; the model's .to() would fail later with an AssertionError
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LegokitError(f"device {device!r}: this torch {torch.__version__} sees no CUDA GPU (CPU-only build, "
                               "or no driver); use device 'cpu', or 'auto' for CUDA when present")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LegokitError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from "
                               "0; use e.g. 'cuda:0' or 'auto'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LegokitError(f"device {device!r}: Apple's MPS backend is not available here; use 'cpu' or 'auto'")
    return dev


def deterministic_cuda() -> None:
    """Make seeded CUDA runs repeatable, for the whole process: deterministic torch algorithms (an op that has
    none warns and runs anyway), cuDNN without autotuning, and cuBLAS with a fixed workspace.

    ``CUBLAS_WORKSPACE_CONFIG`` (``:4096:8`` unless already set) takes effect only if it is set before the
    process's first cuBLAS call: ``load_model`` calls this before it moves a model to CUDA; to be sure, export it
    in the shell. Deterministic kernels can be slower; the CPU is deterministic at a fixed thread count anyway.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"`` -> bfloat16 on CUDA, float32 elsewhere (bf16 matmul is very slow on CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise LegokitError(f"unknown dtype {dtype!r}: use one of 'auto', {', '.join(map(repr, table))}")
    return table[dtype]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a shared cache or run directory wants them readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_yaml_mapping(path: str | Path, what: str, missing_fix: str, shape: str) -> dict:
    """A YAML file that must hold a mapping (an empty file gives ``{}``), read with a clear error for each way
    it can be wrong: ``what`` names the file ("config file"), ``missing_fix`` says what to do when it does not
    exist, ``shape`` what the mapping should look like."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LegokitError(f"{what} {str(path)!r} does not exist: {missing_fix}")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise LegokitError(f"{what} {str(path)!r} is not valid YAML: {err}") from err
    if d is not None and not isinstance(d, dict):
        raise LegokitError(f"{what} {str(path)!r} must hold {shape}, not {type(d).__name__}")
    return d or {}


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def progress_bar(iterable=None, **kwargs):
    """A ``tqdm.auto`` bar (a widget in Jupyter, text elsewhere): every loop a person waits for uses this one.

    ``LEGOKIT_PROGRESS=0`` turns every bar off whatever the caller asked for. The test suite sets it: a
    notebook kernel that streams widget updates while nbval waits for the cell's reply fills ZeroMQ's
    1000-message queue, and the dropped "idle" message then fails the cell on a 5 s output timeout.
    """
    from tqdm.auto import tqdm

    if os.environ.get("LEGOKIT_PROGRESS", "1").strip().lower() in ("0", "false", "no", "off"):
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


def progress_write(message: str, file=None) -> None:
    """Print a line without breaking the progress bars on screen (``tqdm.write``)."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=file)


def release_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A block's weights are many tensors of a few MiB; once freed, glibc keeps them in its heap, so every
    client model built and dropped in a round would otherwise stay in the process's resident memory.
    """
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


LEAN_THRESHOLD = 1 << 20  # bytes: allocations from 1 MiB up are mapped and unmapped one by one
_heap_mode = "default"


def lean_heap(threshold: int = LEAN_THRESHOLD) -> None:
    """Trade speed for resident memory for the rest of this process: glibc's ``malloc`` maps every
    allocation of ``threshold`` bytes or more on its own and unmaps it when freed, and trims the heap's top
    from ``threshold`` bytes free.

    By default glibc keeps freed activation and weight-sized buffers in its heap for reuse; in LoRA training
    the heap grows to several times the live tensors (``make demo``: the peak above the loaded LLM is about
    4x what is live). Lean, the peak follows the live tensors, and every large tensor costs fresh pages:
    federated training took 1.22-1.47x as long, a whole run 1.14-1.36x, on the machines this was measured on
    (docs/measurements.md, memory).
    Numbers are unchanged: only where the memory comes from changes.

    Raises:
        LegokitError: the C library is not glibc (no ``mallopt``), or ``threshold`` is not positive.
    """
    global _heap_mode
    if threshold <= 0:
        raise LegokitError(f"lean_heap: threshold must be a positive number of bytes; got {threshold}")
    mallopt = _glibc("mallopt")
    if mallopt is None:
        raise LegokitError("lean_heap needs glibc's mallopt (Linux); this C library has none: run without "
                           "--lean-memory")
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    if not (mallopt(m_mmap_threshold, threshold) and mallopt(m_trim_threshold, threshold)):
        raise LegokitError(f"glibc refused a malloc threshold of {threshold} bytes: give a smaller threshold "
                           f"(the default is {LEAN_THRESHOLD})")
    _heap_mode = f"lean (malloc maps allocations of {threshold} bytes or more one by one)"
    release_heap()


def heap_mode() -> str:
    """``"default"`` (glibc keeps freed memory for reuse), or what ``lean_heap`` set."""
    return _heap_mode


@functools.cache
def _glibc(name: str):
    """glibc's function ``name`` (``malloc_trim``, ``mallopt``), looked up once; None where the C library has
    none."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):  # not glibc
        return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
