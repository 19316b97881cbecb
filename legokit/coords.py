"""Coordinates of a block's SLM against the LLM's: the one place tensors cross between the two.

An unstructured, N:M or dense block keeps the LLM's shapes (its pruned weights are zeros), so its map is the
identity. A structured block keeps whole rows (output channels, heads) and columns (input channels) of each
linear weight: ``index[name] = (rows, cols)``, either ``None`` when that side is whole. ``expand`` puts an SLM
tensor into LLM coordinates (zero where the SLM has no weight), ``shrink`` takes the kept part of an LLM
tensor; ``expand_factors`` / ``shrink_factors`` do the same for LoRA factors A (r, in) and B (out, r), so
that ``B_llm @ A_llm == expand(B @ A)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from legokit.prune import Index
from legokit.utils import LegokitError


class CoordinateMap:
    """SLM <-> LLM coordinates of one block (``block.coords``).

    Args:
        owner: the block's id, for error messages.
        shapes: ``{module name: (out, in)}`` in the LLM.
        index: ``{module name: (rows, cols)}`` kept by a structured block, or None (same coordinates).
    """

    def __init__(self, owner: str, shapes: Mapping[str, tuple[int, int]], index: Mapping[str, Index] | None):
        self.owner = owner
        self.shapes = shapes
        self.index = index

    @property
    def identity(self) -> bool:
        """True when the SLM has the LLM's shapes (unstructured, N:M and dense blocks)."""
        return self.index is None

    def llm_shape(self, name: str) -> tuple[int, int]:
        """Shape of a module's weight in the LLM (a clear error for a module the block does not have)."""
        if name not in self.shapes:
            raise LegokitError(f"block {self.owner} has no module {name!r}; modules look like "
                               f"{next(iter(self.shapes))!r}")
        return self.shapes[name]

    def local_shape(self, name: str) -> tuple[int, int]:
        """Shape of a module's weight in the SLM."""
        out_f, in_f = self.llm_shape(name)
        if self.identity:
            return out_f, in_f
        rows, cols = self.index[name]
        return (out_f if rows is None else len(rows)), (in_f if cols is None else len(cols))

    def check(self, name: str, t: torch.Tensor, coords: str = "LLM") -> None:
        """Raise when ``t`` does not have the module's shape in ``coords`` (``"LLM"`` or ``"SLM"``)."""
        shape = self.llm_shape(name) if coords == "LLM" else self.local_shape(name)
        if tuple(t.shape) != tuple(shape):
            raise LegokitError(f"{name}: got a tensor of shape {tuple(t.shape)}; expected {tuple(shape)} "
                               f"({coords} coordinates of block {self.owner})")

    def expand(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """SLM coordinates (out_small, in_small) -> LLM coordinates, zero where the SLM has no weight.

        With the identity map ``t`` comes back unchanged.
        """
        self.check(name, t, "SLM")
        if self.identity:
            return t
        out_f, in_f = self.llm_shape(name)
        rows, cols = self.index[name]
        if rows is not None:
            t = t.new_zeros(out_f, t.shape[1]).index_copy_(0, rows.to(t.device), t)
        if cols is not None:
            t = t.new_zeros(out_f, in_f).index_copy_(1, cols.to(t.device), t)
        return t

    def shrink(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """LLM coordinates (out, in) -> SLM coordinates (the kept rows and columns)."""
        self.check(name, t, "LLM")
        if self.identity:
            return t
        rows, cols = self.index[name]
        if rows is not None:
            t = t.index_select(0, rows.to(t.device))
        if cols is not None:
            t = t.index_select(1, cols.to(t.device))
        return t

    def expand_factors(self, name: str, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """LoRA factors SLM -> LLM: A (r, in_small) -> (r, in), B (out_small, r) -> (out, r), zero-filled."""
        _check_factors(name, A, B, self.local_shape(name), f"SLM shape of block {self.owner}")
        if self.identity:
            return A, B
        out_f, in_f = self.llm_shape(name)
        rows, cols = self.index[name]
        if cols is not None:
            A = A.new_zeros(A.shape[0], in_f).index_copy_(1, cols.to(A.device), A)
        if rows is not None:
            B = B.new_zeros(out_f, B.shape[1]).index_copy_(0, rows.to(B.device), B)
        return A, B

    def shrink_factors(self, name: str, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """LoRA factors LLM -> SLM: A (r, in) -> (r, in_small), B (out, r) -> (out_small, r)."""
        _check_factors(name, A, B, self.llm_shape(name), "LLM shape")
        if self.identity:
            return A, B
        rows, cols = self.index[name]
        if cols is not None:
            A = A.index_select(1, cols.to(A.device))
        if rows is not None:
            B = B.index_select(0, rows.to(B.device))
        return A, B


def _check_factors(name: str, A: torch.Tensor, B: torch.Tensor, shape: tuple[int, int], what: str) -> None:
    out_f, in_f = shape
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_f or B.shape[0] != out_f or A.shape[0] != B.shape[1]:
        raise LegokitError(f"{name}: factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit the {what} "
                           f"({out_f}, {in_f}): expected A (r, {in_f}), B ({out_f}, r)")
