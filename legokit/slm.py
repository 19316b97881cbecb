"""Building a block's SLM: a ``transformers`` model of the LLM's class, made from the LLM as it is now.

``block`` is a ``legokit.blocks.Block`` (used through its ``llm``, ``shapes``, ``masks``, ``coords``,
``overrides`` and ``sizes``; this module does not import blocks, which imports it).

``build_slm(block)`` is what ``block.model`` calls on first access. Pruned linear weights are new tensors
(``M ⊙ W_llm``, or the block's stored values where pruning reconstructed them; a structured block's kept rows
and columns); embeddings, norms and the LM head share the LLM's storage read-only. A structured block's SLM
gets a smaller config (fewer heads and MLP channels), so it is physically smaller.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from legokit.prune import StructuredSizes, apply_mask
from legokit.utils import LegokitError

# ----- packed masks ----------------------------------------------------------------------------------------
# Format (stored blocks depend on it): numpy ``packbits`` of the flattened mask, first bit high, zero-padded to
# whole bytes. On the CPU numpy's packbits / unpackbits do the work (table-driven SIMD, many times faster than
# the same bit operations as torch kernels there); on any other device torch bit operations produce the same
# bytes without leaving it, so a view or a masked LoRA layer on a GPU never copies its mask through the host.
_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    """``[7, 6, ..., 0]`` as uint8 on ``device``, made once per device (a per-call copy would sync a GPU)."""
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(7, -1, -1, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor of its bits on the mask's device (1/8 of its bytes): numpy ``packbits`` of
    the flattened mask, first bit high."""
    mask = mask.detach()
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.numpy().reshape(-1)))
    return _pack_bits(mask)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``pack_mask``: a new bool tensor of ``shape`` on ``packed``'s device.

    Unpacking is a small fraction of the layer's matmul, so views and masked LoRA unpack per call instead of
    holding one bool per weight (``bench/bench_memory.py`` times a view block's LoRA step against a copied
    block's).
    """
    n = math.prod(shape)
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).view(np.bool_)).view(tuple(shape))
    return _unpack_bits(packed, n).view(tuple(shape))


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """``pack_mask`` in torch bit operations, on the mask's device (any device; used off the CPU)."""
    flat = mask.reshape(-1)
    if flat.numel() % 8:  # packbits pads the last byte with zeros
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    bits = flat.view(torch.uint8).view(-1, 8) << _shifts(flat.device)  # (bytes, 8): each bit at its place
    return bits.sum(1, dtype=torch.uint8)  # (ceil(numel / 8),): the bits of a byte never overlap


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of ``packed`` as a flat bool tensor, in torch bit operations on its device."""
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)).bitwise_and_(1)  # (bytes, 8) of 0 / 1, first bit high
    return bits.view(torch.bool).view(-1)[:n]


def check_bits(bits: torch.Tensor, shape: Sequence[int], what: str) -> None:
    """Refuse packed bits that cannot be a mask of ``shape`` (uint8, ceil(numel / 8) bytes)."""
    need = -(-math.prod(shape) // 8)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != need:
        raise LegokitError(f"{what}: packed mask bits must be uint8 of {need} bytes for a {tuple(shape)} mask; got "
                           f"{bits.dtype} {tuple(bits.shape)}")


@torch.no_grad()
def slm_weight(block, name: str, w_llm: torch.Tensor | None = None) -> torch.Tensor:
    """The block's base weight of one module in its own coordinates (a new tensor).

    ``w_llm``: the LLM's weight of that module (default: read it from ``block.llm``).
    """
    w = block.llm.get_submodule(name).weight if w_llm is None else w_llm
    if block.structured:
        return block.coords.shrink(name, w)
    if name in block.overrides:
        out = torch.zeros_like(w)
        out[block.masks[name].to(w.device)] = block.overrides.get(name).to(w.device, w.dtype)
        return out
    if block.dense:
        return w.detach().clone()
    return apply_mask(w, block.masks[name])


def attention_dims(llm: nn.Module) -> dict[str, int]:
    """``num_heads``, ``num_kv_heads`` and ``head_dim`` of a decoder LLM."""
    return attention_dims_of(llm.config)


def attention_dims_of(c) -> dict[str, int]:
    """``num_heads``, ``num_kv_heads`` and ``head_dim`` of a decoder config (Gemma 3 sets ``head_dim`` itself)."""
    return {"num_heads": c.num_attention_heads, "num_kv_heads": getattr(c, "num_key_value_heads", None)
            or c.num_attention_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads}


def slm_config(config, sizes: StructuredSizes | None):
    """A copy of the LLM's transformers config with a structured block's per-layer ``sizes`` (None: unchanged)."""
    config = copy.deepcopy(config)
    if sizes is not None:
        config.head_dim = attention_dims_of(config)["head_dim"]  # unchanged; hidden / heads no longer gives it
        config.num_attention_heads = sizes.heads
        config.num_key_value_heads = sizes.kv_heads
        config.intermediate_size = sizes.channels
    return config


@torch.no_grad()
def build_slm(block, view: bool = True) -> nn.Module:
    """The block's SLM, built from ``block.llm`` as it is now plus the block's stored values.

    ``view=True`` (unstructured, N:M and dense blocks): every pruned linear layer is a ``LinearView`` of the
    LLM's that shares the block's packed mask, so the SLM adds nothing but SparseGPT's kept values to the
    memory of the LLM and the block, instead of a copy of its linear weights. ``view=False``, and structured
    blocks always: the layers hold their own weights (a structured SLM is physically smaller, which is its point).
    """
    llm = block.llm
    views = view and not block.structured
    config = slm_config(llm.config, block.sizes if block.structured else None)
    with torch.device("meta"):  # no memory until the real tensors are assigned
        model = type(llm)(config)
    state, viewed = {}, []
    for key, t in llm.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod in block.shapes and views:
            viewed.append(key)  # the view computes from the LLM's own tensor
        elif mod in block.shapes and leaf == "weight":
            state[key] = slm_weight(block, mod, t)
        elif mod in block.shapes and leaf == "bias" and block.structured:
            rows = block.index[mod][0]
            state[key] = t.clone() if rows is None else t.index_select(0, rows.to(t.device))
        elif mod in block.shapes:
            state[key] = t.clone()
        else:
            state[key] = t  # embeddings, norms, LM head: the LLM's storage, read-only by contract
    missing, unexpected = model.load_state_dict(state, assign=True, strict=not views)
    if sorted(missing) != sorted(viewed) or unexpected:  # pragma: no cover - a transformers change
        raise LegokitError(f"building the SLM of {block.id}: unexpected state keys {sorted(missing)[:3]} "
                           f"{unexpected[:3]}")
    if views:
        for name in block.shapes:
            parent, _, child = name.rpartition(".")
            values = block.overrides.get(name) if name in block.overrides else None
            source = llm.get_submodule(name)
            if block.dense and values is None:
                view = LinearView(source)
            elif block.masks.packed is not None:  # the block's own bits: the view adds no memory for its mask
                view = LinearView(source, values=values, bits=block.masks.packed[name].to(source.weight.device))
            else:
                view = LinearView(source, block.masks[name], values)
            setattr(model.get_submodule(parent), child, view)
    for key, buf in llm.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in state
        mod, _, leaf = key.rpartition(".")
        model.get_submodule(mod)._buffers[leaf] = buf
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = copy.deepcopy(getattr(llm, "generation_config", None))
    model.name_or_path = f"{getattr(llm, 'name_or_path', 'llm')}:{block.id}"
    return model.train(llm.training)


# ----- views: a block's linear layer computed from the LLM's weight, never stored ----------------------------
class LinearView(nn.Linear):
    """A block's linear layer as a view of the LLM's: its weight is ``M ⊙ W_llm`` (``mask``), the block's
    stored values at ``M`` (``values``, SparseGPT), or ``W_llm`` itself (a dense block), computed per call from
    the LLM's live tensor and dropped after it; backward recomputes it instead of keeping it.

    So the SLM holds the mask as bits (``bits``, one bit per weight, unpacked per call; a block's views share
    the block's own packed masks) and, for SparseGPT, the kept values, never a second copy of the weights; and
    it sees every change made to the LLM's weight since (merge mode relies on it). The source layer is not a
    submodule: the SLM's ``state_dict`` and ``parameters`` do not include the LLM's weights (``materialize``
    turns views into plain layers for export or in-place edits). ``weight`` and ``mask`` return new tensors
    (editing them changes nothing: ``apply_delta`` and ``detach_lora(merge=True)`` refuse views).
    """

    def __init__(self, source: nn.Linear, mask: torch.Tensor | None = None, values: torch.Tensor | None = None,
                 *, bits: torch.Tensor | None = None):
        nn.Module.__init__(self)
        out_f, in_f = source.weight.shape
        if mask is not None and bits is not None:
            raise LegokitError("give a view its mask as bool (mask) or packed (bits), not both")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (out_f, in_f)):
            raise LegokitError(f"a view's mask must be bool of the LLM module's shape {(out_f, in_f)}; got "
                               f"{mask.dtype} {tuple(mask.shape)}")
        if bits is not None:
            check_bits(bits, (out_f, in_f), "a view's mask")
            if values is not None:
                mask = unpack_mask(bits, (out_f, in_f))  # for the values check only
        if values is not None and (mask is None or values.numel() != int(mask.sum())):
            raise LegokitError(f"a view's stored values must come with its mask, one value per kept weight; got "
                               f"{values.numel()} values for {None if mask is None else int(mask.sum())} kept")
        self.in_features, self.out_features = in_f, out_f
        object.__setattr__(self, "source", source)  # the LLM's layer: not registered, not ours to save or train
        if bits is None and mask is not None:
            bits = pack_mask(mask)
        self.register_buffer("bits", bits, persistent=False)  # uint8 (ceil(out * in / 8),) or None (dense)
        self.register_buffer("values", values, persistent=False)  # (kept,) or None

    @property
    def mask(self) -> torch.Tensor | None:
        """The keep-mask, bool ``(out, in)``, unpacked from ``bits`` (a new tensor per access); None when dense."""
        return None if self.bits is None else unpack_mask(self.bits, (self.out_features, self.in_features))

    def effective_weight(self) -> torch.Tensor:
        """``(out, in)``: the weight this layer computes with now (a new tensor unless the block is dense)."""
        w = self.source.weight.detach()
        mask = self.mask
        if self.values is not None:
            return torch.zeros_like(w).masked_scatter_(mask, self.values.to(w.dtype))
        if mask is not None:
            return w * mask
        return w

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.effective_weight()

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        b = self.source.bias
        return None if b is None else b.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ViewLinearFn.apply(x, self)

    def materialized(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding a copy of the effective weight (and bias)."""
        w = self.effective_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.source.bias is not None,
                        device="meta")
        lin.weight = nn.Parameter(w.clone() if self.bits is None else w, requires_grad=False)  # dense: w is W_llm
        if self.source.bias is not None:
            lin.bias = nn.Parameter(self.source.bias.detach().clone(), requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        kind = "dense" if self.bits is None else "stored values" if self.values is not None else "masked"
        return f"in_features={self.in_features}, out_features={self.out_features}, view of the LLM ({kind})"


class _ViewLinearFn(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W = view.effective_weight()``, recomputed in backward instead of saved."""

    @staticmethod
    def forward(ctx, x, view):
        ctx.view = view
        return F.linear(x, view.effective_weight(), view.bias)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.view.effective_weight(), None


def materialize(model: nn.Module) -> nn.Module:
    """Replace every ``LinearView`` in ``model`` (also under a LoRA layer) by a plain ``nn.Linear`` copy, in
    place; returns ``model``. For export and for code that edits weights in place."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LinearView):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, mod.materialized())
    return model
