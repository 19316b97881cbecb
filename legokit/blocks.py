"""Building blocks: SLMs pruned from one LLM, kept light and built on demand.

A ``Block`` is what a client's SLM is made of, stored as little as possible:

- ``masks``: keep-masks in LLM coordinates and shapes, bit-packed (numpy ``packbits``) and unpacked one
  module per access; structured blocks store kept row / column indices instead and derive the masks
  (``legokit.block_storage`` holds the mask and override storage and the safetensors files).
- overrides: only weights that are *not* ``M ⊙ W_llm`` are stored, as the values at the kept positions
  (SparseGPT's reconstructed weights). Magnitude, Wanda and structured blocks store no weights.
- ``model``: built on first access by ``legokit.slm.build_slm`` from the *current* LLM plus the overrides,
  and freed by ``release()``. Its pruned linear layers are views of the LLM's (``slm.LinearView``: the mask is
  applied per call, unpacked from the block's own bits, no weight is copied; a structured block's are smaller
  copies); embeddings, norms and the LM head share the LLM's storage read-only. So a block derived from the
  LLM sees every change made to the LLM since (a live view too): in merge mode the caller adds ΔW_g to the
  LLM and calls ``add_to_base(name, ΔW_g)`` on each block, which only updates what the LLM cannot give back
  (overrides, and a live structured model's copies).

``extract_blocks`` makes the blocks of one method and pattern at several sparsities. In ``one_shot``
calibration one dense pass gives the statistics of every level and the masks are nested
(M_75 ⊆ M_50 ⊆ M_25 ⊆ dense) for every method (``level_masks``): Wanda and magnitude pick the
levels from one sort of the same scores; SparseGPT runs its OBS pass per level from the shared Hessian,
lowest sparsity first, each level choosing its mask inside the previous one (its pruned weights pruned
first), then reconstructs. ``sequential`` calibration (each layer fed by the already pruned earlier layers, as the
Wanda and SparseGPT references) runs one pass per level, and its masks are not nested.

Structured blocks rank MLP channels and attention heads by the method's per-weight scores summed over
each channel's / head's weights (SparseGPT: its OBS saliency, without reconstruction). Every layer keeps
the same counts, so one smaller config of the LLM's family describes the SLM; its masks are whole rows / columns in
LLM coordinates, and ``block.coords`` (``legokit.coords.CoordinateMap``) maps tensors between the two
coordinate systems.

Memory: a block holds one bit per LLM linear weight, plus, for
SparseGPT, the reconstructed kept values ((1 - s) x 4 bytes per weight; ``save(dir, offload=True)`` or
``Block.load(dir, llm)`` keep them on disk and read one module at a time while the model is built).
"""

from __future__ import annotations

import gc
import json
import math
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from legokit.block_storage import MaskMap, Overrides, load_tensors, save_tensors
from legokit.calibration import calibration_inputs, layerwise_calibration
from legokit.coords import CoordinateMap
from legokit.data import calibration_texts
from legokit.models import decoder_layers, layer_of, linear_modules
from legokit.prune import (
    Index,
    Pattern,
    StructuredSizes,
    check_calibration,
    check_method,
    index_mask,
    inverse_hessian_factor,
    method_scores,
    nested_masks,
    parse_pattern,
    resolve_sparsity,
    structured_levels,
    structured_select,
)
from legokit.slm import LinearView, attention_dims, build_slm, pack_mask
from legokit.sparsegpt import sparsegpt_prune
from legokit.utils import LegokitError, atomic_write_json, release_heap

FORMAT_VERSION = 1


# ----- the block --------------------------------------------------------------------------------------------
class Block:
    """One building block: an SLM of the LLM at one sparsity, stored as masks (+ overrides), built lazily.

    Attributes:
        sparsity, method, pattern, calibration: how it was made.
        masks: ``{LLM module name: bool keep-mask in LLM shape}`` (a ``MaskMap``; unpacks per access).
        coords: the SLM <-> LLM coordinate map (``legokit.coords.CoordinateMap``).
        overrides: stored values at the kept positions that are not ``M ⊙ W_llm`` (SparseGPT), by module.
        sizes: per-layer sizes of a structured SLM (``StructuredSizes``), else None.
        meta: calibration details (windows, tokens, seed, SparseGPT settings).
    """

    def __init__(self, llm: nn.Module, *, sparsity: float, method: str, pattern: str,
                 shapes: Mapping[str, tuple], packed: Mapping[str, torch.Tensor] | None = None,
                 index: Mapping[str, Index] | None = None,
                 overrides: Overrides | Mapping[str, torch.Tensor] | None = None,
                 sizes: StructuredSizes | None = None, calibration: str = "one_shot",
                 meta: dict | None = None, view: bool = True):
        self.llm = llm
        self.view = view  # build the SLM as views of the LLM's weights (legokit.slm.LinearView), not copies
        self.sparsity, self.method, self.pattern = float(sparsity), method, str(pattern)
        self.calibration = calibration
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.index = dict(index) if index is not None else None
        self.masks = MaskMap(self.shapes, packed=packed, index=self.index)
        self.coords = CoordinateMap(self.id, self.shapes, self.index)
        if not isinstance(overrides, Overrides):
            overrides = Overrides(dict(overrides or {}))
        self.overrides = overrides
        self.sizes = sizes
        self.meta = dict(meta or {})
        self._model: nn.Module | None = None

    # ----- identity ---------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """E.g. ``"wanda-unstructured-50"``, ``"sparsegpt-2:4-50"``, ``"wanda-structured-25"``."""
        return f"{self.method}-{self.pattern}-{round(100 * self.sparsity)}"

    @property
    def structured(self) -> bool:
        """True when the SLM is physically smaller (kept rows / columns index into the LLM)."""
        return self.index is not None

    @property
    def built(self) -> bool:
        """True while the SLM is built (between the first ``model`` access and ``release()``)."""
        return self._model is not None

    @property
    def local_masks(self) -> Mapping[str, torch.Tensor] | None:
        """Keep-masks in the SLM's own coordinates, or None when nothing inside its weights is pruned
        (dense and structured blocks). A ``MaskMap``: each access unpacks one module's mask."""
        if self.dense or self.structured:
            return None
        return self.masks

    @property
    def dense(self) -> bool:
        """True for the sparsity-0 block (a full copy of the LLM's linear weights)."""
        return self.sparsity == 0

    def __repr__(self) -> str:
        built = "built" if self._model is not None else "not built"
        return (f"Block({self.id!r}, {len(self.shapes)} modules, {self.nbytes() / 2**20:.1f} MiB stored, "
                f"model {built})")

    def nbytes(self) -> int:
        """Bytes the block holds in memory besides its model (packed masks, indices, overrides)."""
        return sum(self.masks.stored_bytes(n) for n in self.shapes) + self.overrides.memory_bytes()

    # ----- the model ----------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The SLM, built on first access from the current LLM plus the stored overrides."""
        if self._model is None:
            self._model = build_slm(self, view=self.view)
        return self._model

    def release(self) -> None:
        """Drop the built SLM (it is rebuilt, from the LLM as it is then, on the next access)."""
        if self._model is not None:
            ref = weakref.ref(self._model)
            self._model = None
            if ref() is not None:  # only a reference cycle (or a caller's variable) keeps it alive
                gc.collect()
            release_heap()

    @torch.no_grad()
    def add_to_base(self, name: str, delta_llm: torch.Tensor) -> None:
        """Merge mode: the block's base weight += M ⊙ delta (delta in LLM coordinates).

        Call it together with adding ``delta`` to the LLM itself (``broadcast.MergeBroadcast`` does both): weights
        derived from the LLM (and a live SLM of views) then follow by construction, so only stored overrides
        (SparseGPT's reconstructed weights) and a live SLM that holds copies are updated here.
        """
        self.coords.check(name, delta_llm, "LLM")
        if name in self.overrides:
            vals = self.overrides.get(name)
            self.overrides.set(name, vals + delta_llm[self.masks[name].to(delta_llm.device)].to(vals))
        if self._model is not None:
            mod = self._model.get_submodule(name)
            base = getattr(mod, "base_layer", mod)  # a LoRA wrapper keeps the linear as base_layer
            if isinstance(base, LinearView):  # it reads the LLM's weight: only its stored values change
                if base.values is not None:
                    base.values = self.overrides.get(name)
                return
            w = base.weight
            local = self.coords.shrink(name, delta_llm)
            if not self.dense and not self.structured:
                local = local * self.masks[name].to(local.device)
            w += local.to(w.device, w.dtype)

    # ----- files ---------------------------------------------------------------------------------------
    def save(self, directory: str | Path, offload: bool = False) -> None:
        """Write ``block.json`` + safetensors (bit-packed masks, kept indices, overrides) to ``directory``.

        ``offload=True`` then drops the in-memory overrides; they are read back from the file on use.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        info = {"format_version": FORMAT_VERSION, "id": self.id, "sparsity": self.sparsity,
                "method": self.method, "pattern": self.pattern, "calibration": self.calibration,
                "meta": self.meta,
                "shapes": {n: list(s) for n, s in self.shapes.items()},
                "sizes": None if self.sizes is None else vars(self.sizes).copy(),
                "llm": getattr(self.llm, "name_or_path", None), "overrides": sorted(self.overrides.names())}
        if self.masks.packed is not None:
            save_tensors(d / "masks.safetensors", {n: p.contiguous() for n, p in self.masks.packed.items()})
        if self.index is not None:
            flat = {f"{n}.{k}": t.clone() for n, (r, c) in self.index.items()  # clone: q rows = o cols
                    for k, t in (("rows", r), ("cols", c)) if t is not None}
            save_tensors(d / "index.safetensors", flat)
        if len(self.overrides):
            tensors = {n: self.overrides.get(n).detach().cpu().contiguous() for n in self.overrides.names()}
            save_tensors(d / "overrides.safetensors", tensors)
            del tensors
            if offload:
                self.overrides = Overrides(path=d / "overrides.safetensors")
        atomic_write_json(d / "block.json", info)  # last: a directory with block.json is complete

    @classmethod
    def load(cls, directory: str | Path, llm: nn.Module, lazy: bool = True, view: bool = True) -> Block:
        """Read a block written by ``save`` for ``llm`` (checked against its module shapes).

        ``lazy``: overrides stay on disk and are read one module at a time when the model is built.
        """
        d = Path(directory)
        if not (d / "block.json").is_file():
            raise LegokitError(f"{d} holds no saved block (no block.json)")
        info = json.loads((d / "block.json").read_text())
        if info.get("format_version") != FORMAT_VERSION:
            raise LegokitError(f"{d}: block format {info.get('format_version')}; this legokit reads "
                               f"{FORMAT_VERSION}")
        have = {n: tuple(m.weight.shape) for n, m in linear_modules(llm).items()}
        shapes = {n: tuple(s) for n, s in info["shapes"].items()}
        # block.json is written with sorted keys: restore the LLM's module order (layers.2 before layers.10)
        shapes = {n: shapes[n] for n in have if n in shapes} | {n: s for n, s in shapes.items() if n not in have}
        for n, s in shapes.items():
            if have.get(n) != s:
                raise LegokitError(f"block {d} was made for another LLM ({info.get('llm')!r}, not "
                                   f"{getattr(llm, 'name_or_path', None)!r}): module {n} has shape {s} in the "
                                   f"block and {have.get(n)} in this LLM; extract the blocks again for this LLM")
        packed = index = None
        if (d / "masks.safetensors").is_file():
            packed = load_tensors(d / "masks.safetensors")
        if (d / "index.safetensors").is_file():
            flat = load_tensors(d / "index.safetensors")
            index = {n: (flat.get(f"{n}.rows"), flat.get(f"{n}.cols")) for n in shapes}
        ov = d / "overrides.safetensors"
        if ov.is_file():
            overrides = Overrides(path=ov) if lazy else Overrides(load_tensors(ov))
        else:
            overrides = Overrides()
        sizes = StructuredSizes(**info["sizes"]) if info.get("sizes") else None
        return cls(llm, sparsity=info["sparsity"], method=info["method"], pattern=info["pattern"],
                   shapes=shapes, packed=packed, index=index, overrides=overrides, sizes=sizes,
                   calibration=info.get("calibration", "one_shot"), meta=info.get("meta"), view=view)


# ----- extraction -------------------------------------------------------------------------------------------
def level_masks(method: str, weight: torch.Tensor, sparsities: Sequence[float | None],
                pattern: str | Pattern = "unstructured", *, act_norm: torch.Tensor | None = None,
                hessian: torch.Tensor | None = None, percdamp: float = 0.01,
                blocksize: int = 128) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """One module's keep-masks at several sparsities, nested, as ``extract_blocks`` makes them.

    Magnitude and Wanda: ``nested_masks`` of the method's scores (``act_norm`` (in,) for Wanda). SparseGPT:
    ``sparsegpt.sparsegpt_prune`` level by level from one inverse-Hessian factor of ``hessian`` (in, in),
    lowest sparsity first, each level inside the previous mask, reconstructing the weight. Every method
    prunes rows independently, so modules fed the same input may be passed stacked, (out_1 + out_2, in).

    Returns:
        ``(masks, weights)``: one bool (out, in) keep-mask per entry of ``sparsities``, in that order, and
        for SparseGPT the reconstructed (out, in) weight per entry (None for the other methods).
    """
    check_method(method)
    pat = parse_pattern(pattern)
    levels = [resolve_sparsity(s, pat) for s in sparsities]
    if method != "sparsegpt":
        scores = method_scores(method, weight, act_norm=act_norm, hessian=hessian, percdamp=percdamp)
        return nested_masks(scores, levels, str(pat)), None
    if hessian is None:
        raise LegokitError("sparsegpt masks need the calibration hessian (InputStats.hessian)")
    factor = inverse_hessian_factor(hessian, percdamp)  # shared by every level
    done: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    within = None
    for s in sorted(set(levels)):
        new_weight, within = sparsegpt_prune(weight, hessian, s, str(pat), blocksize=blocksize,
                                             percdamp=percdamp, within=within, factor=factor)
        done[s] = (within, new_weight)
    return [done[s][0] for s in levels], [done[s][1] for s in levels]


class _Level:
    """What extraction accumulates for one sparsity level."""

    def __init__(self) -> None:
        self.packed: dict[str, torch.Tensor] = {}
        self.overrides: dict[str, torch.Tensor] = {}
        self.index: dict[str, Index] = {}


def extract_blocks(llm: nn.Module, tokenizer, sparsities: Sequence[float] = (0, 0.25, 0.5, 0.75),
                   method: str = "wanda", pattern: str = "unstructured", calibration: str = "one_shot",
                   n_calib: int = 32, seq_len: int = 256, seed: int = 0,
                   texts: Sequence[str] | None = None, *,
                   blocksize: int = 128, percdamp: float = 0.01, batch_size: int = 8,
                   progress: bool = True) -> list[Block]:
    """Prune ``llm`` into building blocks, one per sparsity; the LLM itself is not modified.

    Args:
        llm, tokenizer: a causal LM of a supported family (``legokit.architectures``) and its tokenizer.
        sparsities: pruned fractions in [0, 1); 0 gives the dense block. An N:M pattern allows 0 and N/M.
        method: ``magnitude`` | ``wanda`` | ``sparsegpt``.
        pattern: ``unstructured`` | ``structured`` | ``"N:M"`` (N of every M weights zero).
        calibration: ``one_shot`` (one dense pass serves every level; nested masks) | ``sequential``
            (one pass per level through the already pruned layers). Magnitude needs no calibration.
        n_calib, seq_len: calibration windows (fewer when ``texts`` are short).
        seed: seeds the window offset (and the text draw when ``texts`` is None).
        texts: calibration texts; default ``legokit.data.calibration_texts``.
        blocksize, percdamp: SparseGPT's lazy-batch block size and Hessian dampening.
    Returns:
        One ``Block`` per entry of ``sparsities``, in that order.
    """
    check_method(method)
    pat = parse_pattern(pattern)
    check_calibration(calibration)
    if isinstance(sparsities, (int, float)) or len(sparsities) == 0:
        raise LegokitError(f"sparsities={sparsities!r}: give a non-empty list such as (0, 0.25, 0.5, 0.75)")
    levels = [resolve_sparsity(s, pat) for s in sparsities]
    if len(set(levels)) != len(levels):
        raise LegokitError(f"sparsities={list(sparsities)} repeats a level: list each once")
    linears = linear_modules(llm)
    if not linears:
        raise LegokitError(f"{type(llm).__name__} has no q/k/v/o/gate/up/down_proj linear layers to prune")
    shapes = {n: tuple(m.weight.shape) for n, m in linears.items()}
    pruned = sorted(s for s in levels if s > 0)
    dims = attention_dims(llm) if pat.kind == "structured" else {}
    sizes: dict[float, StructuredSizes] = {}
    if pat.kind == "structured":  # one-shot: each count capped by the lower level's, so the masks nest
        sizes = structured_levels(pruned, nested=calibration == "one_shot", hidden=llm.config.hidden_size,
                                  intermediate=llm.config.intermediate_size, **dims)
    if pat.kind == "nm" and pruned:
        bad = [n for n, (_, i) in shapes.items() if i % pat.m]
        if bad:
            raise LegokitError(f"pattern {pattern!r} needs input sizes divisible by {pat.m}; {bad[0]} has "
                               f"shape {shapes[bad[0]]}")
    meta = {"seed": seed}
    input_ids = None
    if method != "magnitude" and pruned:
        if texts is None:
            texts = calibration_texts(n_calib * max(1, math.ceil(seq_len / 128)), seed=seed)
        input_ids = calibration_inputs(tokenizer, texts, n_calib, seq_len, seed)
        meta.update(calib_windows=int(input_ids.shape[0]), calib_seq_len=int(input_ids.shape[1]),
                    calib_tokens=int(input_ids.numel()))
    if method == "sparsegpt":
        meta.update(blocksize=blocksize, percdamp=percdamp)

    acc = {s: _Level() for s in pruned}
    layers = decoder_layers(llm)
    prefix = next(n for n, m in llm.named_modules() if m is layers)

    def on_layer(i: int, layer: nn.Module, stats, todo: list[float], propagate: bool):
        names = {n.rsplit(".", 1)[-1]: n for n in linears if n.startswith(f"{prefix}.{i}.")}
        weights = {n: linears[n].weight.detach() for n in names.values()}
        new: dict[str, torch.Tensor] = {}
        if pat.kind == "structured":
            short, factors = {}, {}
            for k, n in names.items():
                data = {}  # what the method scores with, besides the weight
                if method == "wanda":
                    data = {"act_norm": stats.act_norm(n)}
                elif method == "sparsegpt":  # q/k/v and gate/up share their input, so their Hessian factor
                    key = stats.shared(n)
                    if key not in factors:
                        factors[key] = inverse_hessian_factor(stats.hessian(n), percdamp)
                    data = {"hessian": stats.hessian(n), "percdamp": percdamp, "factor": factors[key]}
                short[k] = method_scores(method, weights[n], **data)
            for s in todo:
                chosen = structured_select(short, sizes[s], **dims)
                for k, n in names.items():
                    acc[s].index[n] = chosen[k]
                    if propagate:
                        new[n] = weights[n] * index_mask(shapes[n], *chosen[k]).to(weights[n].device)
        elif method == "sparsegpt":  # modules fed the same input share a Hessian: pruned together, rows stacked
            groups: dict[str, list[str]] = {}
            for n in weights:
                groups.setdefault(stats.shared(n), []).append(n)
            for members in groups.values():
                rows = [weights[n].shape[0] for n in members]
                keeps, recon = level_masks(method, torch.cat([weights[n] for n in members], 0), todo, pat,
                                           hessian=stats.hessian(members[0]), percdamp=percdamp,
                                           blocksize=blocksize)
                for s, keep, w_new in zip(todo, keeps, recon, strict=True):
                    for n, k_n, w_n in zip(members, keep.split(rows), w_new.split(rows), strict=True):
                        acc[s].packed[n] = pack_mask(k_n).cpu()  # a block stores its masks on the CPU
                        acc[s].overrides[n] = w_n[k_n].cpu().clone()  # (kept,) reconstructed values, row-major
                        new[n] = w_n
        else:
            for n, w in weights.items():
                act_norm = stats.act_norm(n) if method == "wanda" else None
                for s, m in zip(todo, level_masks(method, w, todo, pat, act_norm=act_norm)[0], strict=True):
                    acc[s].packed[n] = pack_mask(m).cpu()
                    if propagate:
                        new[n] = w * m.to(w.device)
        return new if propagate else None

    if pruned:
        if input_ids is None:  # magnitude: no data; walk the layers directly
            for i in range(len(layers)):
                on_layer(i, layers[i], None, pruned, False)
        elif calibration == "one_shot":
            layerwise_calibration(llm, input_ids, lambda i, layer, st: on_layer(i, layer, st, pruned, False),
                                  norms=method == "wanda", hessians=method == "sparsegpt",
                                  batch_size=batch_size, progress=progress, desc=f"{method} one-shot")
        else:
            for s in pruned:
                layerwise_calibration(llm, input_ids,
                                      lambda i, layer, st, s=s: on_layer(i, layer, st, [s], True),
                                      norms=method == "wanda", hessians=method == "sparsegpt",
                                      batch_size=batch_size, progress=progress,
                                      desc=f"{method} sequential {s:g}")

    blocks = []
    for s in levels:
        a = acc.get(s)
        structured = pat.kind == "structured" and s > 0
        blocks.append(Block(llm, sparsity=s, method=method, pattern=str(pat), shapes=shapes,
                            packed=a.packed if a is not None and not structured else None,
                            index=a.index if structured else None,
                            overrides=a.overrides if a is not None else None,
                            sizes=sizes.get(s), calibration=calibration, meta=meta))
    return blocks


# ----- reports --------------------------------------------------------------------------------------------
def sparsity_report(block: Block) -> pd.DataFrame:
    """Per layer and module: achieved sparsity, parameters, bytes as stored and bytes of the SLM weight.

    Columns: ``name, layer, module, shape, params, kept, sparsity, slm_shape, slm_params, stored_bytes``
    (packed mask / kept indices + overrides the block holds) and ``model_bytes`` (the SLM's weight as it
    computes with it: smaller only for structured blocks; a view computes it per layer and drops it).
    """
    rows = []
    elem = next(block.llm.parameters()).element_size()
    for name, shape in block.shapes.items():
        params = shape[0] * shape[1]
        slm = block.coords.local_shape(name)
        kept = int(block.masks[name].sum())
        stored = block.masks.stored_bytes(name)
        if name in block.overrides:
            stored += block.overrides.numel(name) * elem
        rows.append({"name": name, "layer": layer_of(name), "module": name.rsplit(".", 1)[-1], "shape": tuple(shape),
                     "params": params, "kept": kept, "sparsity": 1 - kept / params, "slm_shape": slm,
                     "slm_params": slm[0] * slm[1], "stored_bytes": stored,
                     "model_bytes": slm[0] * slm[1] * elem})
    return pd.DataFrame(rows)

