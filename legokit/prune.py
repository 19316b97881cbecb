"""Pruning, as score -> mask -> apply, with calibration statistics gathered by hooks.

- Scores: ``magnitude_scores`` (|W|), ``wanda_scores`` (|W| * ||X_j||_2), ``obs_scores`` (SparseGPT's
  OBS saliency w^2 / [H^-1]_jj^2); ``method_scores`` picks one by method name. ``sparsegpt_prune`` is
  SparseGPT's OBS pruning with weight reconstruction from the calibration Hessian (Frantar & Alistarh, 2023).
  ``output_error`` is what a pruned weight costs: its relative output error on the calibration inputs.
- Masks: ``prune_mask(scores, sparsity, pattern)`` -> bool keep-mask (True = kept) for
  ``unstructured`` (per output row, as Wanda), ``"N:M"`` (N of every M consecutive inputs are zero, so
  "2:4" is 50% sparse) and ``structured`` (whole output rows of one matrix). Layer-level structured
  pruning (whole MLP channels and attention heads, GQA groups kept consistent) is
  ``structured_sizes`` + ``structured_select``.
- Calibration: ``calibration_inputs`` turns texts into token windows; ``InputStats`` is the hook object
  (removed on exit) collecting per-input norms (Wanda) and Hessians X^T X (SparseGPT);
  ``layerwise_calibration`` runs the windows through the decoder one layer at a time, so memory is
  bounded by one layer's statistics, either dense (``one_shot``) or through the already pruned
  earlier layers (``sequential``).

Sparsity is always the pruned fraction; masks are keep-masks in the weight's (out, in) shape.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from legokit.names import CALIBRATION_MODES, METHODS, NM_PATTERN, PATTERN_KINDS, PATTERNS
from legokit.utils import LegokitError, progress_bar


# ----- validation ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern: ``kind`` is "unstructured", "structured" or "nm" (n zeros per m)."""

    kind: str
    n: int = 0
    m: int = 0

    @property
    def implied_sparsity(self) -> float | None:
        return self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """Parse "unstructured", "structured" or "N:M" (N zeros in every M, 0 < N < M)."""
    if isinstance(pattern, Pattern):
        return pattern
    if pattern in PATTERN_KINDS:
        return Pattern(pattern)
    m = re.fullmatch(NM_PATTERN, str(pattern))
    if m is None:
        raise LegokitError(f"unknown pattern {pattern!r}: use one of {PATTERNS} (N:M such as '2:4' "
                           "= 2 of every 4 weights zero)")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise LegokitError(f"pattern {pattern!r} is invalid: N:M needs 0 < N < M (N zeros in every M "
                           "consecutive weights), e.g. '2:4'")
    return Pattern("nm", n, mm)


def check_method(method: str) -> str:
    """Return ``method`` if it is one of ``METHODS``, else raise listing them."""
    if method not in METHODS:
        raise LegokitError(f"unknown pruning method {method!r}: use one of {METHODS}")
    return method


def check_calibration(mode: str) -> str:
    """Return ``mode`` if it is one of ``CALIBRATION_MODES``, else raise listing them."""
    if mode not in CALIBRATION_MODES:
        raise LegokitError(f"unknown calibration mode {mode!r}: use one of {CALIBRATION_MODES}")
    return mode


def resolve_sparsity(sparsity: float | None, pattern: str | Pattern) -> float:
    """Check a sparsity against its pattern; ``None`` means the one an N:M pattern implies.

    0 (the dense block) is valid for every pattern; any other sparsity of an N:M pattern must equal N/M.
    """
    pat = parse_pattern(pattern)
    if sparsity is None:
        if pat.implied_sparsity is None:
            raise LegokitError(f"pattern {str(pat)!r} needs an explicit sparsity in [0, 1)")
        return pat.implied_sparsity
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise LegokitError(f"sparsity={sparsity!r} is not in [0, 1): use e.g. 0.5 for half of the weights "
                           "pruned")
    s = float(sparsity)
    if pat.kind == "nm" and s != 0 and abs(s - pat.implied_sparsity) > 1e-9:
        raise LegokitError(f"sparsity={s} contradicts pattern {str(pat)!r}, which prunes {pat.n} of every "
                           f"{pat.m} weights (sparsity {pat.implied_sparsity:g}); pass that, 0 or None")
    return s


def n_pruned(sparsity: float, n: int) -> int:
    """How many of ``n`` weights a sparsity prunes (round half up, the same everywhere)."""
    return int(math.floor(sparsity * n + 0.5))


# ----- scores ----------------------------------------------------------------------------------------
def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|, shape (out, in)."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_j||_2; ``act_norm`` (in,) is each input feature's norm over calibration tokens."""
    if act_norm.ndim != 1 or act_norm.shape[0] != weight.shape[1]:
        raise LegokitError(f"act_norm has shape {tuple(act_norm.shape)}; expected ({weight.shape[1]},), "
                           "one norm per input feature")
    return weight.detach().abs().float() * act_norm.float().to(weight.device)[None, :]  # (out, in)


Factor = tuple[torch.Tensor, torch.Tensor]  # (U (in, in) upper Cholesky factor of H^-1, dead (in,) bool)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> Factor:
    """SparseGPT's upper Cholesky factor U of the dampened inverse Hessian, and the dead inputs.

    Returns ``(U (in, in), dead (in,) bool)``; pass it to ``sparsegpt_prune(factor=...)`` to prune one
    weight at several sparsities without refactoring the Hessian.
    """
    H = hessian.detach().float().clone()  # (in, in)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1  # an input that is always zero: any weight there is free to prune
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        return torch.linalg.cholesky(Hinv, upper=True), dead
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise LegokitError(f"the calibration Hessian is not positive definite even with percdamp={percdamp}: "
                           "raise percdamp or use more calibration text") from err


def obs_scores(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01,
               factor: Factor | None = None) -> torch.Tensor:
    """SparseGPT's OBS saliency w_ij^2 / [H^-1]_jj^2 (before any reconstruction), shape (out, in)."""
    _check_hessian(weight, hessian)
    U, _ = factor if factor is not None else inverse_hessian_factor(hessian, percdamp)
    d = torch.diag(U)  # (in,): diagonal of the Cholesky factor, as SparseGPT's first block uses
    return weight.detach().float().square() / d.square()[None, :].to(weight.device)


def method_scores(method: str, weight: torch.Tensor, act_norm: torch.Tensor | None = None,
                  hessian: torch.Tensor | None = None, percdamp: float = 0.01,
                  factor: Factor | None = None) -> torch.Tensor:
    """The per-weight score ``method`` prunes by, shape (out, in).

    ``magnitude`` needs nothing else, ``wanda`` the input norms ``act_norm`` (in,), ``sparsegpt`` the
    calibration ``hessian`` (in, in) (and optionally its ``factor``) for its OBS saliency.
    """
    check_method(method)
    if method == "magnitude":
        return magnitude_scores(weight)
    if method == "wanda":
        if act_norm is None:
            raise LegokitError("wanda scores need act_norm, the input norms from calibration (InputStats.act_norm)")
        return wanda_scores(weight, act_norm)
    if hessian is None:
        raise LegokitError("sparsegpt scores need the calibration hessian (InputStats.hessian)")
    return obs_scores(weight, hessian, percdamp, factor=factor)


def output_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error of a pruned weight on the calibration inputs: ||X (W - W')^T|| / ||X W^T||.

    Computed from the Hessian H ∝ X^T X (its scale cancels): ||X D^T||_F^2 = tr(D X^T X D^T). ``pruned`` is
    the weight the SLM computes with (M ⊙ W, or SparseGPT's reconstruction), in ``weight``'s shape.
    Returns 0 for an all-zero output.
    """
    _check_hessian(weight, hessian)
    if pruned.shape != weight.shape:
        raise LegokitError(f"pruned weight has shape {tuple(pruned.shape)}; expected {tuple(weight.shape)}")
    W = weight.detach().float()  # (out, in)
    D = W - pruned.detach().to(W)  # (out, in)
    H = hessian.detach().float().to(W.device)  # (in, in)
    num = float(((D @ H) * D).sum(dtype=torch.float64))  # tr(D H D^T)
    den = float(((W @ H) * W).sum(dtype=torch.float64))  # tr(W H W^T)
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def _check_hessian(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise LegokitError(f"hessian has shape {tuple(hessian.shape)}; expected ({cols}, {cols}) for a "
                           f"weight of shape {tuple(weight.shape)}")


# ----- masks -----------------------------------------------------------------------------------------
def _check_scores(scores: torch.Tensor) -> None:
    if scores.ndim != 2:
        raise LegokitError(f"scores must be a 2-D (out, in) tensor, got shape {tuple(scores.shape)}")


def prune_mask(scores: torch.Tensor, sparsity: float | None, pattern: str = "unstructured") -> torch.Tensor:
    """Keep-mask (bool, True = kept) that prunes the lowest scores.

    Args:
        scores: (out, in) importance of each weight.
        sparsity: pruned fraction in [0, 1); ``None`` for N:M takes the implied N/M.
        pattern: ``unstructured`` (exactly ``round(sparsity * in)`` per output row, as Wanda),
            ``"N:M"`` (the N lowest of every M consecutive inputs of a row), or ``structured`` (whole
            output rows, ranked by their summed score).
    Returns:
        Bool tensor of the scores' shape. Masks from the same scores are nested across sparsities.
    """
    return nested_masks(scores, [sparsity], pattern)[0]


def nested_masks(scores: torch.Tensor, sparsities: Sequence[float | None],
                 pattern: str = "unstructured") -> list[torch.Tensor]:
    """``prune_mask`` for several sparsities with one sort: the masks are nested (higher sparsity ⊆ lower).

    The sort is deterministic, so separate ``prune_mask`` calls on the same scores nest as well.
    """
    _check_scores(scores)
    pat = parse_pattern(pattern)
    levels = [resolve_sparsity(s, pat) for s in sparsities]
    out_f, in_f = scores.shape
    x = scores.detach().float().cpu().numpy()
    if pat.kind == "structured":
        order = np.argsort(x.sum(1))  # (out,) lowest row score first
        masks = []
        for s in levels:
            keep = np.ones(out_f, dtype=bool)
            keep[order[: n_pruned(s, out_f)]] = False
            masks.append(np.broadcast_to(keep[:, None], (out_f, in_f)).copy())
    elif pat.kind == "nm":
        if in_f % pat.m:
            raise LegokitError(f"pattern {str(pat)!r} needs the input size ({in_f}) to be a multiple of "
                               f"{pat.m}")
        order = np.argsort(x.reshape(out_f, in_f // pat.m, pat.m), axis=-1)  # (out, in/M, M)
        masks = []
        for s in levels:
            keep = np.ones(order.shape, dtype=bool)
            if s > 0:
                np.put_along_axis(keep, order[..., : pat.n], False, axis=-1)
            masks.append(keep.reshape(out_f, in_f))
    else:
        order = np.argsort(x, axis=1)  # (out, in) lowest score first in every row
        masks = []
        for s in levels:
            keep = np.ones((out_f, in_f), dtype=bool)
            np.put_along_axis(keep, order[:, : n_pruned(s, in_f)], False, axis=1)
            masks.append(keep)
    return [torch.from_numpy(m).to(scores.device) for m in masks]


def check_mask(weight: torch.Tensor, mask: torch.Tensor, name: str = "weight") -> None:
    """Raise unless ``mask`` is a bool tensor of ``weight``'s shape."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise LegokitError(f"mask for {name} must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise LegokitError(f"mask for {name} has shape {tuple(mask.shape)}; the weight has shape "
                           f"{tuple(weight.shape)}")


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """M ⊙ W as a new tensor (pruned entries exactly zero)."""
    check_mask(weight, mask)
    return weight * mask.to(weight.device)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights of ``model`` in place: W_name <- M_name ⊙ W_name.

    Every name and shape is checked before the first weight changes.
    """
    modules = dict(model.named_modules())
    for name in masks:
        mod = modules.get(name)
        if mod is None or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            raise LegokitError(f"mask names module {name!r}, which the model does not have (or has no "
                               "weight)")
        check_mask(mod.weight, masks[name], name)
    for name in masks:
        w = modules[name].weight
        w.mul_(masks[name].to(w.device))


# ----- SparseGPT ---------------------------------------------------------------------------------------
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
    _check_hessian(weight, hessian)
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


# ----- structured: whole MLP channels and attention heads -------------------------------------------------
@dataclass(frozen=True)
class StructuredSizes:
    """Per-layer sizes of a structured block (the same in every layer, so one HF config describes it)."""

    kv_heads: int  # kept key/value heads (GQA groups)
    heads_per_group: int  # kept query heads per kept group
    channels: int  # kept MLP intermediate channels

    @property
    def heads(self) -> int:
        return self.kv_heads * self.heads_per_group


def structured_sizes(sparsity: float, *, hidden: int, intermediate: int, num_heads: int, num_kv_heads: int,
                     head_dim: int) -> StructuredSizes:
    """Sizes that remove ``sparsity`` of each decoder layer's linear weights.

    Attention shrinks along a fixed path from (all groups, all heads per group): each step removes one
    query head from every group or one whole group (the kv head with its query heads), whichever removes
    fewer weights. The point of the path closest to the target is taken (it moves monotonically along
    the path as the sparsity grows), and the MLP channel count makes up the rest so the layer as a
    whole hits the target. Raises when the target would keep less than half of one group with one head.
    """
    if num_heads % num_kv_heads:
        raise LegokitError(f"num_attention_heads={num_heads} is not a multiple of "
                           f"num_key_value_heads={num_kv_heads}")
    s = resolve_sparsity(sparsity, "structured")
    G, r = num_kv_heads, num_heads // num_kv_heads
    if s == 0:
        return StructuredSizes(G, r, intermediate)

    def units(g: int, h: int) -> int:  # attention weights of g groups x h heads, in head_dim*hidden units
        return 2 * g * h + 2 * g  # q rows + o columns per head, k and v rows per group

    path = [(G, r)]
    while path[-1] != (1, 1):
        g, h = path[-1]
        steps = [c for c in ((g, h - 1), (g - 1, h)) if min(c) >= 1]
        path.append(max(steps, key=lambda c: (units(*c), c[0] == g)))  # fewest removed; tie: drop heads
    target = (1 - s) * units(G, r)
    best = min(path, key=lambda c: (abs(units(*c) - target), -units(*c)))
    if target < units(1, 1) / 2:
        raise LegokitError(f"structured sparsity {s} would remove every attention head of each layer "
                           f"({num_heads} heads in {num_kv_heads} groups): use a sparsity of at most "
                           f"{1 - units(1, 1) / 2 / units(G, r):.3f}")
    unit = head_dim * hidden
    attn_kept = units(*best) * unit
    total = units(G, r) * unit + 3 * hidden * intermediate
    channels = min(intermediate, int(math.floor(((1 - s) * total - attn_kept) / (3 * hidden) + 0.5)))
    if channels < 1:
        raise LegokitError(f"structured sparsity {s} would remove every MLP channel of each layer: use a "
                           "lower sparsity")
    return StructuredSizes(best[0], best[1], channels)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ascending (stable order, so smaller k gives a subset)."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return torch.sort(order[:k]).values


Index = tuple[torch.Tensor | None, torch.Tensor | None]  # kept (rows, cols) in LLM coordinates; None = all


def structured_select(scores: Mapping[str, torch.Tensor], sizes: StructuredSizes, *, num_heads: int,
                      num_kv_heads: int, head_dim: int) -> dict[str, Index]:
    """Pick the channels, groups and heads of one decoder layer to keep.

    Args:
        scores: per-weight scores keyed by short module name (q_proj, k_proj, v_proj, o_proj, gate_proj,
            up_proj, down_proj), each in the weight's (out, in) shape.
        sizes: ``structured_sizes`` of the block.
    Returns:
        ``{short name: (rows, cols)}``: kept row / column indices in LLM coordinates (``None`` = all),
        in the order the smaller layer stores them (query heads grouped by their kv head).
    """
    d, r = head_dim, num_heads // num_kv_heads
    rows = {k: v.float().sum(1).cpu() for k, v in scores.items() if k != "o_proj" and k != "down_proj"}
    channel = rows["gate_proj"] + rows["up_proj"] + scores["down_proj"].float().sum(0).cpu()  # (I,)
    q_head = rows["q_proj"].reshape(num_heads, d).sum(1)  # (H,)
    o_head = scores["o_proj"].float().sum(0).cpu().reshape(num_heads, d).sum(1)  # (H,)
    head = q_head + o_head
    kv = (rows["k_proj"] + rows["v_proj"]).reshape(num_kv_heads, d).sum(1)  # (G,)
    group = kv + head.reshape(num_kv_heads, r).sum(1)  # (G,)
    groups = _top(group, sizes.kv_heads)
    heads = torch.cat([g * r + _top(head[g * r:(g + 1) * r], sizes.heads_per_group) for g in groups.tolist()])
    ar = torch.arange(d)
    q_rows = (heads[:, None] * d + ar).reshape(-1)  # (heads*d,) kept q rows / o columns
    kv_rows = (groups[:, None] * d + ar).reshape(-1)  # (kv_heads*d,)
    ch = _top(channel, sizes.channels)
    return {"q_proj": (q_rows, None), "k_proj": (kv_rows, None), "v_proj": (kv_rows, None),
            "o_proj": (None, q_rows), "gate_proj": (ch, None), "up_proj": (ch, None), "down_proj": (None, ch)}


def index_mask(shape: Sequence[int], rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """Keep-mask of whole kept rows and columns, shape ``shape``."""
    out_f, in_f = shape
    r = torch.zeros(out_f, dtype=torch.bool)
    c = torch.zeros(in_f, dtype=torch.bool)
    r[rows if rows is not None else slice(None)] = True
    c[cols if cols is not None else slice(None)] = True
    return r[:, None] & c[None, :]


# ----- calibration -----------------------------------------------------------------------------------------
def calibration_inputs(tokenizer, texts: Iterable[str], n_calib: int, seq_len: int,
                       seed: int = 0) -> torch.Tensor:
    """Token windows for calibration: the texts joined by EOS, cut into up to ``n_calib`` windows.

    Windows are consecutive and non-overlapping, from a seeded offset. Fewer than ``n_calib`` come back
    when the texts are short (one shorter window when they hold less than ``seq_len`` tokens).
    Returns (windows, seq_len) int64.
    """
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise LegokitError("no calibration text: pass a non-empty list of strings (texts=...), or prepare "
                           "the data with `legokit setup` for legokit.data.calibration_texts")
    if n_calib < 1 or seq_len < 2:
        raise LegokitError(f"n_calib={n_calib} and seq_len={seq_len} must be >= 1 and >= 2")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    if len(stream) < 2:
        raise LegokitError("the calibration texts tokenize to fewer than 2 tokens: pass longer texts")
    ids = torch.tensor(stream, dtype=torch.long)
    if len(ids) < seq_len:
        return ids[None, :]
    k = min(n_calib, len(ids) // seq_len)
    gen = torch.Generator().manual_seed(seed)
    start = int(torch.randint(0, len(ids) - k * seq_len + 1, (1,), generator=gen))
    return ids[start:start + k * seq_len].reshape(k, seq_len)


class InputStats:
    """Forward hooks that accumulate statistics of the inputs of some linear layers.

    ``norms``: sum of x_j^2 per input feature (Wanda); ``hessians``: X^T X (SparseGPT). Layers fed the
    very same input tensor (q/k/v, gate/up) share one accumulator. Use as a context manager: the
    hooks are removed on exit.
    """

    def __init__(self, modules: Mapping[str, nn.Module], norms: bool = True, hessians: bool = False):
        self.modules = dict(modules)
        self.norms, self.hessians = norms, hessians
        self.key_of: dict[str, str] = {}  # module name -> accumulator key (shared inputs share one)
        self.sq: dict[str, torch.Tensor] = {}  # key -> (in,) sum of squares
        self.xtx: dict[str, torch.Tensor] = {}  # key -> (in, in)
        self.count: dict[str, int] = {}  # key -> tokens seen
        self._handles: list = []
        self._last: tuple[torch.Tensor, str] | None = None

    def __enter__(self) -> InputStats:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None
        return False

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            if self._last is not None and self._last[0] is x:  # same tensor as the previous layer got
                self.key_of.setdefault(name, self._last[1])
                return
            key = self.key_of.setdefault(name, name)
            self._last = (x, key)
            x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
            if self.norms:
                self.sq[key] = self.sq.get(key, 0) + x.square().sum(0)
            if self.hessians:
                self.xtx[key] = self.xtx.get(key, 0) + x.T @ x
            self.count[key] = self.count.get(key, 0) + x.shape[0]

        return hook

    def act_norm(self, name: str) -> torch.Tensor:
        """||X_j||_2 over every calibration token, shape (in,)."""
        return self.sq[self.key_of[name]].sqrt()

    def hessian(self, name: str) -> torch.Tensor:
        """2 X^T X / n, SparseGPT's layer Hessian, shape (in, in)."""
        key = self.key_of[name]
        return self.xtx[key] * (2.0 / self.count[key])

    def shared(self, name: str) -> str:
        """The accumulator key of ``name`` (modules with the same key saw the same input)."""
        return self.key_of[name]


class _StopForward(Exception):
    pass


def _layer_out(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _capture_layer0(llm: nn.Module, input_ids: torch.Tensor, batch_size: int) -> tuple[list, list]:
    """Hidden states and keyword arguments entering decoder layer 0, one entry per batch."""
    from legokit.models import decoder_layers

    hidden, kwargs = [], []

    def pre_hook(module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    device = next(llm.parameters()).device
    handle = decoder_layers(llm)[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(0, len(input_ids), batch_size):
            try:
                llm(input_ids=input_ids[i:i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


LayerCallback = Callable[[int, nn.Module, InputStats], Mapping[str, torch.Tensor] | None]


@torch.no_grad()
def layerwise_calibration(llm: nn.Module, input_ids: torch.Tensor, on_layer: LayerCallback, *,
                          norms: bool = True, hessians: bool = False, batch_size: int = 8,
                          progress: bool = False, desc: str = "calibrate",
                          layers: Iterable[int] | None = None) -> None:
    """Feed calibration windows through the decoder one layer at a time; the LLM is never modified.

    For every decoder layer: hooks (``InputStats``) record its linear layers' inputs while it runs,
    then ``on_layer(index, layer, stats)`` scores and masks it. If it returns ``{qualified module
    name: pruned weight}``, the next layer's inputs come from a pruned copy of this layer (the
    ``sequential`` mode of Wanda and SparseGPT); if it returns ``None`` they come from the dense layer
    (``one_shot``). Memory: the hidden states of the windows plus one layer's statistics.
    ``layers``: observe only these decoder layers (``on_layer`` is called for them alone); the pass stops
    after the last one.
    """
    from legokit.models import decoder_layers, linear_modules

    decoder = decoder_layers(llm)
    prefix = next(n for n, m in llm.named_modules() if m is decoder)
    chosen = set(range(len(decoder))) if layers is None else {int(i) for i in layers}
    if not chosen or not chosen <= set(range(len(decoder))):
        raise LegokitError(f"layers={sorted(chosen)} must be a non-empty subset of the decoder layers "
                           f"0..{len(decoder) - 1}")
    hidden, kwargs = _capture_layer0(llm, input_ids, batch_size)
    for i, layer in enumerate(progress_bar(decoder[:max(chosen) + 1], desc=desc, disable=not progress,
                                           leave=False)):
        if i not in chosen:  # only feeds the next layer
            hidden = [_layer_out(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
            continue
        linears = {f"{prefix}.{i}.{n}": m for n, m in linear_modules(layer).items()}
        with InputStats(linears, norms=norms, hessians=hessians) as stats:
            outs = [_layer_out(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
        new = on_layer(i, layer, stats)
        del stats
        if new:
            pruned = copy.deepcopy(layer)
            for name, w in new.items():
                pruned.get_submodule(name[len(f"{prefix}.{i}."):]).weight.copy_(w)
            outs = [_layer_out(pruned(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
            del pruned
        hidden = outs
