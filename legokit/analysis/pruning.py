"""Pruning analyses (notebook 01): what calibration saw, each method's scores and masks, what a block costs.

``calibration_stats`` keeps what one dense calibration pass saw at some layers (input norms and Hessians, as
``extract_blocks`` gathers them); from it, ``module_scores`` / ``module_masks`` give one module's scores and
nested masks per method, ``score_sample`` samples every method's score of the same weights,
``reconstruction_errors`` what a block costs each module's output, and ``mask_stats`` / ``kept_overlap`` /
``structured_kept`` describe masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from legokit.blocks import level_masks
from legokit.calibration import calibration_inputs, layerwise_calibration
from legokit.models import layer_of
from legokit.prune import (
    check_method,
    method_scores,
    output_error,
    parse_pattern,
    prune_mask,
    resolve_sparsity,
)
from legokit.slm import attention_dims, slm_weight
from legokit.utils import LegokitError


class CalibrationStats:
    """What calibration saw at some decoder layers' linear inputs, kept for analysis (``calibration_stats``).

    ``act_norms[name]``: ||X_j||_2 per input feature (in,) (Wanda); ``hessians[name]``: 2 X^T X / n (in, in)
    (SparseGPT), one tensor shared by the modules fed the same input (q/k/v, gate/up); ``tokens``: tokens seen.
    """

    def __init__(self, act_norms: dict[str, Tensor], hessians: dict[str, Tensor], tokens: int):
        self.act_norms, self.hessians, self.tokens = act_norms, hessians, tokens

    @property
    def modules(self) -> list[str]:
        """The observed modules, in model order."""
        return list(self.act_norms)

    @property
    def layers(self) -> list[int]:
        """The observed decoder layers."""
        return sorted({layer_of(n) for n in self.act_norms})

    def check(self, name: str) -> str:
        """Return ``name`` if calibration observed it, else raise naming the observed layers."""
        if name not in self.act_norms:
            raise LegokitError(f"module {name!r} was not observed by calibration_stats (layers {self.layers}): "
                               f"use one of its modules, e.g. {self.modules[0]!r}")
        return name

    def __repr__(self) -> str:
        return f"CalibrationStats({len(self.act_norms)} modules of layers {self.layers}, {self.tokens} tokens)"


def calibration_stats(llm: nn.Module, tokenizer, texts: Sequence[str], n_calib: int = 16, seq_len: int = 128,
                      seed: int = 0, layers: Sequence[int] | None = None, batch_size: int = 8) -> CalibrationStats:
    """Input norms and Hessians of the linear modules of ``layers`` (default: all), from one dense pass.

    The windows (``calibration.calibration_inputs``) and the hooks (``calibration.InputStats``, through
    ``calibration.layerwise_calibration``) are the ones ``extract_blocks`` uses in ``one_shot`` mode, so scores
    and masks computed from these statistics are the blocks'. Memory: one Hessian per distinct input of every
    observed layer; the pass stops after the last layer.
    """
    ids = calibration_inputs(tokenizer, texts, n_calib, seq_len, seed)
    norms: dict[str, Tensor] = {}
    hessians: dict[str, Tensor] = {}

    def keep(i: int, layer: nn.Module, st) -> None:
        shared: dict[str, Tensor] = {}
        for name in st.modules:
            norms[name] = st.act_norm(name).cpu()
            key = st.shared(name)
            if key not in shared:
                shared[key] = st.hessian(name).cpu()
            hessians[name] = shared[key]

    layerwise_calibration(llm, ids, keep, norms=True, hessians=True, batch_size=batch_size, layers=layers)
    return CalibrationStats(norms, hessians, int(ids.numel()))


def module_scores(llm: nn.Module, stats: CalibrationStats | None, name: str, method: str,
                  percdamp: float = 0.01) -> Tensor:
    """``prune.method_scores`` of one module of ``llm`` with its calibration statistics, shape (out, in).

    ``stats`` may be None for ``magnitude``, which needs no data.
    """
    w = llm.get_submodule(name).weight
    if method == "magnitude":
        return method_scores(method, w)
    if stats is None:
        raise LegokitError(f"{method} scores need calibration statistics: pass calibration_stats(...)")
    stats.check(name)
    return method_scores(method, w, act_norm=stats.act_norms[name], hessian=stats.hessians[name],
                         percdamp=percdamp)


def module_masks(llm: nn.Module, stats: CalibrationStats | None, name: str, method: str,
                 sparsities: Sequence[float | None], pattern: str = "unstructured",
                 percdamp: float = 0.01, blocksize: int = 128) -> list[Tensor]:
    """Keep-masks of one module at several sparsities, as ``extract_blocks`` makes them in ``one_shot`` mode.

    ``blocks.level_masks`` of the module's weight and calibration statistics: magnitude and Wanda nest the
    levels of one sort of the scores; SparseGPT prunes level by level, lowest sparsity first, each inside the
    previous mask. So the masks are nested for every method.
    Returns one bool (out, in) mask per entry of ``sparsities``, in that order.
    """
    check_method(method)
    pat = parse_pattern(pattern)
    levels = [resolve_sparsity(s, pat) for s in sparsities]
    w = llm.get_submodule(name).weight
    if method == "magnitude":
        return level_masks(method, w, levels, pat)[0]
    if stats is None:
        noun = "masks" if method == "sparsegpt" else "scores"
        raise LegokitError(f"{method} {noun} need calibration statistics: pass calibration_stats(...)")
    stats.check(name)
    return level_masks(method, w, levels, pat, act_norm=stats.act_norms[name], hessian=stats.hessians[name],
                       percdamp=percdamp, blocksize=blocksize)[0]


def score_sample(llm: nn.Module, stats: CalibrationStats, layers: Sequence[int] | None = None,
                 methods: Sequence[str] = ("magnitude", "wanda", "sparsegpt"), sparsity: float = 0.5,
                 n: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Every method's score of the same sampled weights, module by module (why the methods disagree).

    Args:
        stats: ``calibration_stats`` of (at least) ``layers`` (default: its layers).
        sparsity: the unstructured level at which ``kept`` is reported (``module_masks``).
        n: weights sampled per module (the same positions for every method).
    Returns:
        long table ``layer, kind, module, row, col, method, score, kept``: ``score`` is the method's
        ``prune.method_scores`` at (row, col), ``kept`` whether ``prune.prune_mask`` of those scores at
        ``sparsity`` keeps that weight (for SparseGPT: by its saliency alone, before reconstruction).
    """
    layers = stats.layers if layers is None else list(layers)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name in stats.modules:
        if layer_of(name) not in layers:
            continue
        out_f, in_f = llm.get_submodule(name).weight.shape
        flat = torch.randperm(out_f * in_f, generator=gen)[:n]  # (n,) the same weights for every method
        r, c = flat // in_f, flat % in_f
        for method in methods:
            scores = module_scores(llm, stats, name, method)  # (out, in)
            keep = prune_mask(scores, sparsity)  # by the score alone (SparseGPT's own mask also updates weights)
            rows.append(pd.DataFrame({"layer": layer_of(name), "kind": name.rsplit(".", 1)[-1], "module": name,
                                      "row": r.numpy(), "col": c.numpy(), "method": method,
                                      "score": scores[r, c].cpu().numpy(), "kept": keep[r, c].cpu().numpy()}))
    if not rows:
        raise LegokitError(f"layers={layers} were not observed by calibration_stats (layers {stats.layers})")
    return pd.concat(rows, ignore_index=True)


def kept_overlap(a, b, names: Sequence[str] | None = None) -> pd.DataFrame:
    """How much two blocks of the same sparsity agree, module by module: the share of a's kept weights b keeps.

    ``names``: the modules to compare (default: all). Columns ``module, layer, kind, overlap, chance``:
    ``chance`` is the overlap of two independent random masks of these sparsities (1 - b's sparsity), so
    ``overlap`` far above it means the methods agree.
    """
    if a.shapes.keys() != b.shapes.keys():
        raise LegokitError(f"blocks {a.id} and {b.id} cover different modules: compare blocks of one LLM")
    names = list(a.shapes if names is None else names)
    unknown = [n for n in names if n not in a.shapes]
    if unknown:
        raise LegokitError(f"blocks {a.id} and {b.id} have no module {unknown[0]!r}")
    rows = []
    for name in names:
        ma, mb = a.masks[name], b.masks[name]
        kept = int(ma.sum())
        rows.append({"module": name, "layer": layer_of(name), "kind": name.rsplit(".", 1)[-1],
                     "overlap": int((ma & mb).sum()) / kept if kept else float("nan"),
                     "chance": float(mb.float().mean())})
    return pd.DataFrame(rows)


def reconstruction_errors(blocks, stats: CalibrationStats) -> pd.DataFrame:
    """What blocks cost each module of the observed layers: ``prune.output_error`` on the calibration inputs.

    Args:
        blocks: one ``Block`` or several (of one LLM); the pruned weight is the block's own
            (``slm.slm_weight``: M ⊙ W, SparseGPT's reconstruction, a structured block's kept rows / columns,
            back in LLM coordinates).
        stats: ``calibration_stats`` of that LLM; its layers are the ones measured.
    Returns:
        columns ``block, module, layer, kind, rel_error`` (||X W^T - X W'^T|| / ||X W^T||; 0 for the dense block).
    """
    blocks = [blocks] if hasattr(blocks, "shapes") else list(blocks)
    rows = []
    for block in blocks:
        for name in stats.modules:
            if name not in block.shapes:
                raise LegokitError(f"block {block.id} has no module {name!r}: compute the stats on the block's LLM")
            w = block.llm.get_submodule(name).weight
            pruned = block.coords.expand(name, slm_weight(block, name, w))  # (out, in) LLM coordinates
            rows.append({"block": block.id, "module": name, "layer": layer_of(name), "kind": name.rsplit(".", 1)[-1],
                         "rel_error": output_error(w, pruned, stats.hessians[name])})
    return pd.DataFrame(rows)


def mask_stats(mask: Tensor, lower: Tensor | None = None) -> dict:
    """Statistics of one keep-mask (bool, out x in), and of its nesting in a lower-sparsity mask.

    Returns ``sparsity``, ``row_sparsity_min`` / ``row_sparsity_max`` (pruned share of the least / most pruned
    output row), ``cols_fully_pruned`` / ``rows_fully_pruned`` (share of inputs / outputs no weight is kept
    of); with ``lower``: ``nested`` (every weight kept here is kept there), ``newly_pruned`` (share of all
    weights pruned here but kept there) and ``violations`` (weights kept here but pruned there).
    """
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise LegokitError(f"mask must be a 2-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    m = mask.cpu()
    row_sparsity = 1 - m.float().mean(1)  # (out,)
    out = {"sparsity": 1 - float(m.float().mean()), "row_sparsity_min": float(row_sparsity.min()),
           "row_sparsity_max": float(row_sparsity.max()), "cols_fully_pruned": float((~m.any(0)).float().mean()),
           "rows_fully_pruned": float((~m.any(1)).float().mean())}
    if lower is not None:
        if lower.shape != mask.shape:
            raise LegokitError(f"lower mask has shape {tuple(lower.shape)}, the mask {tuple(mask.shape)}")
        lo = lower.cpu()
        violations = int((m & ~lo).sum())
        out.update(nested=violations == 0, newly_pruned=float((lo & ~m).float().mean()), violations=violations)
    return out


def structured_kept(block) -> dict[str, np.ndarray]:
    """Which attention heads, KV groups and MLP channels a structured block keeps in each decoder layer.

    Returns bool arrays ``heads`` (layers, num_heads), ``kv_heads`` (layers, num_kv_heads) and ``channels``
    (layers, intermediate), True = kept, read from the block's kept q / k / gate rows.
    """
    if not block.structured:
        raise LegokitError(f"block {block.id} is not structured: it keeps weights, not whole heads and channels")
    dims = attention_dims(block.llm)
    d = dims["head_dim"]
    by_kind: dict[str, dict[int, Tensor]] = {"q_proj": {}, "k_proj": {}, "gate_proj": {}}
    for name, (rows, _) in block.index.items():
        kind = name.rsplit(".", 1)[-1]
        if kind in by_kind:
            by_kind[kind][layer_of(name)] = rows
    layers = sorted(by_kind["q_proj"])
    intermediate = block.shapes[next(n for n in block.shapes if n.endswith("gate_proj"))][0]
    out = {"heads": np.zeros((len(layers), dims["num_heads"]), bool),
           "kv_heads": np.zeros((len(layers), dims["num_kv_heads"]), bool),
           "channels": np.zeros((len(layers), intermediate), bool)}
    for j, layer in enumerate(layers):
        out["heads"][j, torch.unique(by_kind["q_proj"][layer] // d).numpy()] = True
        out["kv_heads"][j, torch.unique(by_kind["k_proj"][layer] // d).numpy()] = True
        out["channels"][j, by_kind["gate_proj"][layer].numpy()] = True
    return out
