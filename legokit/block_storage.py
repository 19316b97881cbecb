"""How a ``blocks.Block`` is stored: its keep-masks, its overridden weights, its safetensors files.

``MaskMap`` gives a block's keep-masks one module per access, from bit-packed masks (``slm.pack_mask``) or,
for a structured block, from kept row / column indices; ``Overrides`` holds the weights at the kept
positions that are not ``M ⊙ W_llm`` (SparseGPT's reconstruction), in memory or read lazily from a file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from legokit.prune import Index, index_mask
from legokit.slm import unpack_mask


# ----- packed masks ----------------------------------------------------------------------------------------
class MaskMap(Mapping):
    """Read-only ``{module name: bool keep-mask in LLM shape}``; each access unpacks one module."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]],
                 packed: Mapping[str, torch.Tensor] | None = None, index: Mapping[str, Index] | None = None):
        self.shapes = dict(shapes)
        self.packed = packed
        self.index = index

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        if self.packed is not None:
            return unpack_mask(self.packed[name], self.shapes[name])
        if self.index is not None:
            return index_mask(self.shapes[name], *self.index[name])
        return torch.ones(self.shapes[name], dtype=torch.bool)  # dense block

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def stored_bytes(self, name: str) -> int:
        """Bytes this map holds for one module (packed bits or kept indices)."""
        if self.packed is not None:
            return self.packed[name].numel()
        if self.index is not None:
            return sum(t.numel() * t.element_size() for t in self.index[name] if t is not None)
        return 0


# ----- override storage ----------------------------------------------------------------------------------
class Overrides:
    """Weights at the kept positions that differ from M ⊙ W_llm: in memory, or read lazily from a file."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, path: Path | None = None):
        self.mem = dict(tensors or {})
        self.path = path
        self.on_disk: set[str] = set()
        if path is not None:
            with safe_open(str(path), framework="pt") as f:
                self.on_disk = set(f.keys()) - set(self.mem)

    def names(self) -> set[str]:
        return set(self.mem) | self.on_disk

    def __contains__(self, name: str) -> bool:
        return name in self.mem or name in self.on_disk

    def __len__(self) -> int:
        return len(self.names())

    def get(self, name: str) -> torch.Tensor:
        if name in self.mem:
            return self.mem[name]
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)

    def set(self, name: str, t: torch.Tensor) -> None:
        self.mem[name] = t
        self.on_disk.discard(name)

    def numel(self, name: str) -> int:
        if name in self.mem:
            return self.mem[name].numel()
        with safe_open(str(self.path), framework="pt") as f:
            return int(np.prod(f.get_slice(name).get_shape()))

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.mem.values())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to a safetensors file atomically (a temporary file, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
