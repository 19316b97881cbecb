"""Pruning, as score -> mask -> apply.

- Scores: ``magnitude_scores`` (|W|), ``wanda_scores`` (|W| * ||X_j||_2), ``obs_scores`` (SparseGPT's
  OBS saliency w^2 / [H^-1]_jj^2); ``method_scores`` picks one by method name. ``output_error`` is what a
  pruned weight costs: its relative output error on the calibration inputs.
- Masks: ``prune_mask(scores, sparsity, pattern)`` -> bool keep-mask (True = kept) for
  ``unstructured`` (per output row, as Wanda), ``"N:M"`` (N of every M consecutive inputs are zero, so
  "2:4" is 50% sparse) and ``structured`` (whole output rows of one matrix). ``blocks.level_masks`` gives one
  module's nested masks at several sparsities for any method (the masks of ``blocks.extract_blocks``).
  Layer-level structured pruning (whole MLP channels and attention heads, GQA groups kept consistent) is
  ``structured_sizes`` + ``structured_select``.

SparseGPT's reconstruction is ``legokit.sparsegpt``; the calibration statistics the scores need (input
norms, Hessians) are gathered by ``legokit.calibration``. Sparsity is always the pruned fraction; masks are
keep-masks in the weight's (out, in) shape.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from legokit.names import CALIBRATION_MODES, METHODS, NM_PATTERN, PATTERN_KINDS, PATTERNS
from legokit.utils import LegokitError


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
    check_hessian(weight, hessian)
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
    check_hessian(weight, hessian)
    if pruned.shape != weight.shape:
        raise LegokitError(f"pruned weight has shape {tuple(pruned.shape)}; expected {tuple(weight.shape)}")
    W = weight.detach().float()  # (out, in)
    D = W - pruned.detach().to(W)  # (out, in)
    H = hessian.detach().float().to(W.device)  # (in, in)
    num = float(((D @ H) * D).sum(dtype=torch.float64))  # tr(D H D^T)
    den = float(((W @ H) * W).sum(dtype=torch.float64))  # tr(W H W^T)
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def check_hessian(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    """Raise unless ``hessian`` is (in, in) for a weight of shape (out, in)."""
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


def structured_levels(sparsities: Sequence[float], *, nested: bool, hidden: int, intermediate: int,
                      num_heads: int, num_kv_heads: int, head_dim: int) -> dict[float, StructuredSizes]:
    """``structured_sizes`` of every pruned level (sparsity > 0), lowest first.

    With ``nested`` (one-shot calibration) each count is capped by the next lower level's, so the kept heads and
    channels of a sparser block are a subset of a denser one's.
    """
    sizes: dict[float, StructuredSizes] = {}
    prev = None
    for s in sorted(x for x in sparsities if x > 0):
        sz = structured_sizes(s, hidden=hidden, intermediate=intermediate, num_heads=num_heads,
                              num_kv_heads=num_kv_heads, head_dim=head_dim)
        if prev is not None and nested:
            sz = StructuredSizes(min(sz.kv_heads, prev.kv_heads), min(sz.heads_per_group, prev.heads_per_group),
                                 min(sz.channels, prev.channels))
        sizes[s] = prev = sz
    return sizes


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
