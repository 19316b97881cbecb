"""SparseGPT: OBS pruning with weight reconstruction from the calibration Hessian (Frantar & Alistarh, 2023).

``sparsegpt_prune`` prunes one weight column by column and updates the columns not yet pruned to undo each
column's error, in blocks of ``blocksize`` columns with lazy batch updates, as the paper. Its score (the OBS
saliency ``prune.obs_scores``) and the inverse-Hessian factor it works from (``prune.inverse_hessian_factor``)
live with the other scores in ``legokit.prune``; ``blocks.level_masks`` runs it at several nested levels.
"""

from __future__ import annotations

import math

import torch

from legokit.prune import (
    Factor,
    Pattern,
    check_hessian,
    check_mask,
    inverse_hessian_factor,
    n_pruned,
    parse_pattern,
    resolve_sparsity,
)
from legokit.utils import LegokitError


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None,
                    pattern: str = "unstructured", blocksize: int = 128, percdamp: float = 0.01,
                    within: torch.Tensor | None = None,
                    factor: Factor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune column by column and update the remaining weights to undo the error (OBS).

    Args:
        weight: (out, in) dense weight; not modified.
        hessian: (in, in) calibration Hessian 2 X^T X / n of the layer's input.
        sparsity: pruned fraction (``None`` for the one an N:M pattern implies).
        pattern: ``unstructured`` (mask chosen per block of ``blocksize`` columns, exactly the same count
            per output row as ``prune_mask``; the reference thresholds each block over all rows) or "N:M".
        blocksize: columns whose mask is chosen together (lazy batch updates, as the paper).
        percdamp: dampening, a fraction of the mean Hessian diagonal added to the diagonal.
        within: optional keep-mask; the new mask is chosen inside it (its pruned weights are pruned
            first), which makes masks of increasing sparsity nested.
        factor: ``inverse_hessian_factor(hessian, percdamp)`` when already computed (then ``hessian``
            only checks the shape).
    Returns:
        ``(new_weight, keep_mask)``: the reconstructed weight (zero where pruned), and the bool keep-mask.
    """
    pat = parse_pattern(pattern)
    if pat.kind == "structured":
        raise LegokitError("sparsegpt_prune reconstructs unstructured or N:M masks; for structured pruning "
                           "rank channels with obs_scores and structured_select")
    s = resolve_sparsity(sparsity, pat)
    check_hessian(weight, hessian)
    if within is not None:
        check_mask(weight, within, "within")
    if blocksize < 1 or (pat.kind == "nm" and blocksize % pat.m):
        raise LegokitError(f"blocksize={blocksize} must be a positive multiple of M for pattern {str(pat)!r}")
    rows, cols = weight.shape
    if s == 0:
        return weight.detach().clone(), torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    W = weight.detach().float().clone()  # (out, in), updated in place as columns are pruned
    Hinv, dead = factor if factor is not None else inverse_hessian_factor(hessian.to(W.device), percdamp)
    Hinv, dead = Hinv.to(W.device), dead.to(W.device)  # (in, in) upper triangular, (in,)
    W[:, dead] = 0
    forced = None if within is None else ~within.to(W.device)  # (out, in) pruned by a lower level
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2]  # (out, b), already updated by the earlier blocks
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b) upper triangular
        f1 = None if forced is None else forced[:, i1:i2]
        if pat.kind == "unstructured":
            d = torch.diag(Hinv1)  # (b,)
            k = n_pruned(s, i2) - n_pruned(s, i1)  # cumulative rounding: each row loses n_pruned(s, in)
            sal = W1.square() / d.square()[None, :]  # (out, b) OBS saliency
            if f1 is not None:
                sal = sal.masked_fill(f1, -math.inf)  # a lower level's pruned weights go first
            mask1 = torch.zeros_like(W1, dtype=torch.bool)  # True = pruned
            mask1.scatter_(1, torch.argsort(sal, dim=1, stable=True)[:, :k], True)
            Q1, Err1 = _obs_loop(W1, Hinv1, mask1)
        else:
            Q1, Err1, mask1 = _obs_loop(W1, Hinv1, None, pat, f1)
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the columns after the block
    return W.to(weight.dtype), ~pruned


def _obs_loop(W1: torch.Tensor, Hinv1: torch.Tensor, mask1: torch.Tensor | None, pat: Pattern | None = None,
              forced: torch.Tensor | None = None):
    """One block, column by column, as the SparseGPT paper. N:M picks its mask every M columns from the
    updated weights. Returns (pruned block, scaled errors[, mask])."""
    W1 = W1.clone()  # (out, b); after column i is done, W1[:, i] is final
    Err1 = torch.zeros_like(W1)
    choose = mask1 is None
    mask1 = torch.zeros_like(W1, dtype=torch.bool) if choose else mask1  # True = pruned
    d = torch.diag(Hinv1)
    dl = d.tolist()
    for i in range(W1.shape[1]):
        if choose and i % pat.m == 0:
            sal = W1[:, i:i + pat.m].square() / d[i:i + pat.m].square()[None, :]  # (out, M)
            if forced is not None:
                sal = sal.masked_fill(forced[:, i:i + pat.m], -math.inf)
            mask1.scatter_(1, i + torch.argsort(sal, dim=1, stable=True)[:, :pat.n], True)
        err = (W1[:, i] * mask1[:, i]).div_(dl[i])  # (out,) (w - q) / d: zero where kept
        W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # OBS update of this and the later columns
        Err1[:, i] = err
    Q1 = W1.masked_fill_(mask1, 0)  # pruned entries are now ~0: make them exactly 0
    return (Q1, Err1, mask1) if choose else (Q1, Err1)
