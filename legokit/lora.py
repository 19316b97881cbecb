"""Masked LoRA: adapters whose update lives only on a block's kept weights, in peft's naming and format.

A client's linear layer computes ``y = x (W + M ⊙ ΔW)ᵀ + b`` with ``ΔW = s · B A`` (``s = alpha / r``),
so a pruned block stays exactly as sparse as it was (``M`` is the keep-mask, ``W`` already zero off it).
Without a mask it is the usual LoRA ``y = base(x) + s · B(A(dropout(x)))``.

Factor convention, used everywhere in legokit: ``A`` is ``(r, in)``, ``B`` is ``(out, r)``, the delta is
``s · B @ A`` with ``s = alpha / r`` where ``r`` is *that module's* rank (peft's rule with ``rank_pattern``).
A broadcast global adapter of rank ``r_g`` is therefore re-factored with
``svd_refactor(ΔW_g, r_g, alpha / r_g)`` and handed to ``attach_lora(..., init=...)`` unchanged: the module
takes the init's rank and ``s = alpha / r_g``, so ``s · B A`` equals the intended delta (up to the SVD
truncation). Factors made with one scaling ``s`` for all modules (whatever their rank) are attached with
``attach_lora(..., scaling=s)`` and saved with ``adapters.save_peft_adapter(..., alpha=None, scaling=s)``.
Reading and writing adapters in peft's format is ``legokit.adapters``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from legokit.config import LoraConfig
from legokit.models import linear_modules
from legokit.slm import LinearView, pack_mask, unpack_mask
from legokit.utils import LegokitError


# ----------------------------------------------------------------------------------------- the layer
def delta_weight(A: Tensor, B: Tensor, scaling: float, mask: Tensor | None = None) -> Tensor:
    """``scaling · B @ A``, zeroed off ``mask`` when one is given.

    Args:
        A: ``(r, in)``; B: ``(out, r)``; mask: bool ``(out, in)`` keep-mask or None.
    Returns:
        the dense ``(out, in)`` delta.
    """
    delta = (B @ A) * scaling  # (out, in)
    return delta if mask is None else delta * mask


class _MaskedLoraFn(torch.autograd.Function):
    """``y = x (W + M ⊙ s·BA)ᵀ + b`` that saves no dense ``(out, in)`` tensor for backward.

    A plain autograd graph keeps the effective weight of every layer alive until backward (about the
    size of the model's linear weights again); here the masked delta is recomputed in backward from the
    small factors instead, and the mask from its bits (``bits``: ``pack_mask`` of ``M``). With dropout the
    LoRA branch sees its own input ``x_lora``.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, bits, scaling, view=None):
        # x, x_lora: (..., in); weight: (out, in); bits: (ceil(out * in / 8),) uint8; lora_A: (r, in); lora_B: (out, r)
        # view: the base layer as a LinearView (weight is None): its weight is recomputed, never saved
        ctx.view = view
        ctx.scaling = scaling
        mask = unpack_mask(bits, (lora_B.shape[0], lora_A.shape[1]))
        ctx.folded = x_lora is None and _folds(view, bits, lora_A)
        if ctx.folded:
            out = F.linear(x, _folded(view, lora_A, lora_B, mask, scaling), bias)
        else:
            if view is not None:
                weight = view.effective_weight()
            if x_lora is None:  # one matmul with the effective weight
                out = F.linear(x, _effective_weight(lora_A, lora_B, mask, scaling, weight), bias)
            else:
                delta = _masked_delta(lora_A, lora_B, mask, scaling, weight.dtype)
                out = F.linear(x, weight, bias) + F.linear(x_lora, delta)
        del mask
        ctx.save_for_backward(x, x_lora, None if view is not None else weight, lora_A, lora_B, bits)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, x_lora, weight, A, B, bits = ctx.saved_tensors
        view, s = ctx.view, ctx.scaling
        mask = unpack_mask(bits, (B.shape[0], A.shape[1]))
        need = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])  # (T, out)
        grad_x = grad_xl = grad_w = grad_b = grad_A = grad_B = None
        if ctx.folded:
            xl = x
            if need[0]:
                grad_x = grad @ _folded(view, A, B, mask, s)
        elif x_lora is None:
            xl = x
            if need[0]:  # the effective weight, recomputed (the first layer needs no input gradient)
                weight = view.effective_weight() if view is not None else weight
                grad_x = grad @ _effective_weight(A, B, mask, s, weight)
        else:
            xl = x_lora
            if view is not None:
                weight = view.effective_weight()
            if need[0]:
                grad_x = grad @ weight
            if need[1]:
                grad_xl = grad @ _masked_delta(A, B, mask, s, weight.dtype)  # (out, in), recomputed
        if need[4] or need[5]:
            gd = (g2.t() @ xl.reshape(-1, xl.shape[-1])).to(A.dtype)  # (out, in): dL/d(effective delta)
            gd.mul_(mask)
            if need[4]:
                grad_A = (B.t() @ gd) * s  # (r, in)
            if need[5]:
                grad_B = (gd @ A.t()) * s  # (out, r)
        if need[2]:
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])
        if need[3]:
            grad_b = g2.sum(0)
        return grad_x, grad_xl, grad_w, grad_b, grad_A, grad_B, None, None, None


def _folds(view: LinearView | None, bits: Tensor, A: Tensor) -> bool:
    """True when the LoRA mask is the view's own (shared bits) and the view's weight is ``M ⊙ W_llm``: then
    ``M ⊙ W + M ⊙ sΔ`` is computed as ``M ⊙ (W + sΔ)``, one ``(out, in)`` tensor and one pass instead of two."""
    return (view is not None and view.values is None and view.bits is bits
            and view.source.weight.dtype == A.dtype)


def _folded(view: LinearView, A: Tensor, B: Tensor, mask: Tensor, scaling: float) -> Tensor:
    # the same sums as _effective_weight at every kept weight (sΔ + W), and zero at every pruned one
    return (B @ A).mul_(scaling).add_(view.source.weight.detach()).mul_(mask)


def _effective_weight(A: Tensor, B: Tensor, mask: Tensor, scaling: float, weight: Tensor) -> Tensor:
    """``W + M ⊙ s·BA``, a new ``(out, in)`` tensor (in-place passes: a few % of the layer's GEMMs; a
    ``torch.where`` on the bool mask would be 4x slower than multiplying by it)."""
    return _masked_delta(A, B, mask, scaling, weight.dtype).add_(weight)


def _stored_weight(layer: nn.Linear) -> Tensor:
    """The tensor a layer's weight lives in, for its shape, dtype and device: a view's LLM weight (reading
    ``.weight`` of a ``LinearView`` would compute a new tensor)."""
    return layer.source.weight if isinstance(layer, LinearView) else layer.weight


def _masked_delta(A: Tensor, B: Tensor, mask: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    delta = (B @ A).mul_(scaling).mul_(mask)  # (out, in), a fresh tensor safe to modify in place
    return delta if delta.dtype == dtype else delta.to(dtype)


class MaskedLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a LoRA adapter whose update is restricted to a keep-mask.

    Attributes follow peft: ``base_layer``, ``lora_A`` (in -> r), ``lora_B`` (r -> out), ``lora_dropout``,
    ``r``, ``lora_alpha``, ``scaling``; ``mask`` is the bool ``(out, in)`` keep-mask or None (plain LoRA), held
    as bits (``bits``, 1/8 of a bool mask's bytes) and unpacked per call: ``mask`` returns a new tensor.
    Factors are float32 when the base weight is half precision (peft's autocast rule).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 mask: Tensor | None = None, generator: torch.Generator | None = None,
                 scaling: float | None = None):
        super().__init__()
        w = _stored_weight(base_layer)  # shape, dtype and device only
        out_f, in_f = w.shape
        if not 1 <= rank <= min(out_f, in_f):
            raise LegokitError(f"LoRA rank {rank} does not fit a {out_f}x{in_f} layer: use 1 <= rank <= "
                               f"{min(out_f, in_f)}")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (out_f, in_f)):
            raise LegokitError(f"mask must be bool of shape {(out_f, in_f)}, "
                               f"got {mask.dtype} {tuple(mask.shape)}")
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        # scaling defaults to peft's alpha / r; an explicit one fixes s (and records alpha = s * r)
        self.scaling = alpha / rank if scaling is None else float(scaling)
        self.r, self.lora_alpha = rank, self.scaling * rank
        fdtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_f, rank, bias=False, device=w.device, dtype=fdtype)
        self.lora_B = nn.Linear(rank, out_f, bias=False, device=w.device, dtype=fdtype)
        # peft's default init: A kaiming-uniform (a=sqrt(5)), B zero, so the layer starts as the base.
        a_init = torch.empty(rank, in_f)
        nn.init.kaiming_uniform_(a_init, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_A.weight.copy_(a_init)
            self.lora_B.weight.zero_()
        bits = None if mask is None else pack_mask(mask).to(w.device)
        if (bits is not None and isinstance(base_layer, LinearView) and base_layer.bits is not None
                and torch.equal(bits, base_layer.bits)):
            bits = base_layer.bits  # the view's own mask (a block's, under mask_in_training): shared
        self.register_buffer("bits", bits, persistent=False)

    @property
    def mask(self) -> Tensor | None:
        """The keep-mask, bool ``(out, in)`` (a new tensor per access), or None (plain LoRA)."""
        return None if self.bits is None else unpack_mask(self.bits, (self.out_features, self.in_features))

    @property
    def weight(self) -> Tensor:
        """The frozen base weight (for code that inspects ``module.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def set_factors(self, A: Tensor, B: Tensor) -> None:
        """Copy ``A`` ``(r, in)`` and ``B`` ``(out, r)`` into the adapter (shapes must match its rank)."""
        with torch.no_grad():
            self.lora_A.weight.copy_(A)
            self.lora_B.weight.copy_(B)

    def get_delta_weight(self) -> Tensor:
        """``M ⊙ (s · B A)`` (or ``s · B A`` without a mask), ``(out, in)``, in the factors' dtype."""
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling, self.mask)

    def forward(self, x: Tensor) -> Tensor:
        A, B = self.lora_A.weight, self.lora_B.weight
        dropout_on = self.training and isinstance(self.lora_dropout, nn.Dropout)
        if self.bits is not None:
            x_lora = self.lora_dropout(x) if dropout_on else None
            base = self.base_layer
            view = base if isinstance(base, LinearView) else None
            return _MaskedLoraFn.apply(x, x_lora, None if view is not None else base.weight, base.bias, A, B,
                                       self.bits, self.scaling, view)
        out = self.base_layer(x)
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(A.dtype))))  # (..., out)
        return out + (lora * self.scaling).to(out.dtype)

    def extra_repr(self) -> str:
        masked = "none" if self.bits is None else f"{self.mask.float().mean().item():.2f} kept"
        return f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:g}, mask={masked}"


# ------------------------------------------------------------------------------------ attach / detach
def lora_modules(model: nn.Module) -> dict[str, MaskedLoraLinear]:
    """The model's ``MaskedLoraLinear`` layers keyed by qualified name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedLoraLinear)}


def attach_lora(model: nn.Module, cfg: LoraConfig, masks: Mapping[str, Tensor] | None = None,
                init: Mapping[str, tuple[Tensor, Tensor]] | None = None, seed: int = 0,
                scaling: float | None = None) -> dict[str, MaskedLoraLinear]:
    """Replace every target ``nn.Linear`` by a ``MaskedLoraLinear`` and freeze everything else.

    Args:
        model: a causal LM (its linear layers in the block's own coordinates).
        cfg: rank, alpha, dropout, target modules, and ``mask_in_training`` (False: masks are ignored).
        masks: {qualified module name: bool ``(out, in)`` keep-mask}; entries for linear layers that are
            not targets are ignored, names that are no linear layer of the model are an error.
        init: {qualified module name: ``(A (r', in), B (out, r'))``} to start from instead of the default
            init (e.g. the broadcast global adapter). That module then has rank ``r'`` and scaling
            ``cfg.alpha / r'``: give factors with ``(cfg.alpha / r') · B @ A`` = the intended delta,
            as ``svd_refactor(delta, r', cfg.alpha / r')`` returns them.
        seed: seeds the kaiming-uniform init of every ``A`` (modules in model order).
        scaling: one scaling ``s`` for every module instead of ``cfg.alpha / r_module`` (for factors made
            with a single scaling, e.g. ``svd_refactor(delta, r_g, s)`` for all modules).
    Returns:
        {qualified name: the new layer}. Nothing is modified when a check fails (``LegokitError``).
    """
    if scaling is not None and not scaling > 0:
        raise LegokitError(f"attach_lora scaling={scaling} must be > 0 (or None for alpha / rank)")
    if lora_modules(model):
        raise LegokitError("the model already has LoRA layers attached: call detach_lora(model) first")
    masks = (masks or {}) if cfg.mask_in_training else {}  # a Mapping: a MaskMap unpacks one module per access
    init = dict(init or {})
    targets = linear_modules(model, tuple(cfg.target_modules))
    all_linear = linear_modules(model)
    unknown = sorted(n for n in masks if n not in all_linear)
    if unknown:
        raise LegokitError(f"masks name modules the model does not have: {unknown[:3]}"
                           f"{' ...' if len(unknown) > 3 else ''}; "
                           f"expected names like {next(iter(all_linear), '')!r}")
    unknown = sorted(n for n in init if n not in targets)
    if unknown:
        raise LegokitError(f"init names modules that are not LoRA targets of this model: {unknown[:3]}"
                           f"{' ...' if len(unknown) > 3 else ''}; targets are {cfg.target_modules}")
    for name, lin in targets.items():
        out_f, in_f = _stored_weight(lin).shape
        if name in masks:
            m = masks[name]
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                raise LegokitError(f"mask for {name} must be a bool tensor, got "
                                   f"{getattr(m, 'dtype', type(m).__name__)}")
            if tuple(m.shape) != (out_f, in_f):
                raise LegokitError(f"mask for {name} has shape {tuple(m.shape)} but the module's weight is "
                                   f"{(out_f, in_f)}: give masks in the block's own coordinates")
        rank = cfg.rank
        if name in init:
            A, B = init[name]
            rank = A.shape[0]
            if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_f or B.shape != (out_f, rank):
                raise LegokitError(f"init for {name}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit "
                                   f"the {out_f}x{in_f} module: need A (r, {in_f}) and B ({out_f}, r)")
        if rank > min(out_f, in_f):
            raise LegokitError(f"LoRA rank {rank} is larger than min(out, in) = {min(out_f, in_f)} of {name} "
                               f"({out_f}x{in_f}): lower lora.rank")

    gen = torch.Generator().manual_seed(seed)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model._legokit_requires_grad = flags  # detach_lora restores them
    for p in model.parameters():
        p.requires_grad_(False)
    out: dict[str, MaskedLoraLinear] = {}
    for name, lin in targets.items():
        rank = init[name][0].shape[0] if name in init else cfg.rank
        layer = MaskedLoraLinear(lin, rank, cfg.alpha, cfg.dropout, masks.get(name), generator=gen,
                                 scaling=scaling)
        if name in init:
            layer.set_factors(*init[name])
        _set_module(model, name, layer)
        out[name] = layer
    return out


def detach_lora(model: nn.Module, merge: bool = False) -> list[str]:
    """Put the original ``nn.Linear`` layers back; with ``merge`` fold ``M ⊙ s·BA`` into their weights.

    Returns the names of the restored layers. ``requires_grad`` flags are restored as before attach.
    """
    names = []
    for name, layer in lora_modules(model).items():
        base = layer.base_layer
        if merge and isinstance(base, LinearView):
            raise LegokitError(f"{name}: the base layer is a view of the LLM's weight, which merging would not "
                               "change: call legokit.slm.materialize(model) first")
        if merge:
            with torch.no_grad():
                base.weight.add_(layer.get_delta_weight().to(base.weight.dtype))
        _set_module(model, name, base)
        names.append(name)
    flags = getattr(model, "_legokit_requires_grad", None)
    if flags is not None:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        del model._legokit_requires_grad
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ------------------------------------------------------------------------------------------ factors
def lora_factors(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """{module name: (A ``(r, in)``, B ``(out, r)``)}, cloned, detached, on the CPU."""
    return {n: (m.lora_A.weight.detach().cpu().clone(), m.lora_B.weight.detach().cpu().clone())
            for n, m in lora_modules(model).items()}


# ----------------------------------------------------------------------------------------- re-factoring
def svd_refactor(delta: Tensor, rank: int, scaling: float, method: str = "full",
                 seed: int = 0) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` factors of ``delta``: ``scaling · B @ A`` is its truncated SVD.

    Args:
        delta: ``(out, in)``; computed in float32.
        rank: target rank, capped at ``min(out, in)``.
        scaling: the scaling the factors will be used with (``alpha / rank`` for a fresh adapter).
        method: ``"full"`` (exact ``torch.linalg.svd``) or ``"lowrank"`` (seeded randomized
            ``torch.svd_lowrank``: faster, approximate).
    Returns:
        ``(A (r, in), B (out, r), energy_kept)`` with the singular values split evenly between the
        factors; ``energy_kept = Σ_{i<r} σ_i² / Σ σ_i²`` (1.0 for a zero matrix).
    """
    if rank < 1:
        raise LegokitError(f"svd_refactor rank={rank} must be >= 1")
    if scaling <= 0:
        raise LegokitError(f"svd_refactor scaling={scaling} must be > 0")
    d = delta.detach().to(torch.float32)
    r = min(rank, *d.shape)
    total = float((d * d).sum())
    if method == "full":
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    elif method == "lowrank":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(d, q=min(r + 10, *d.shape), niter=2)
        U, S, Vh = U[:, :r], S[:r], V[:, :r].t()
    else:
        raise LegokitError(f"svd_refactor method={method!r} is unknown: use 'full' or 'lowrank'")
    # Directions beyond the aggregate's true rank are rounding noise (their σ ~ 1e-7·σ_max) whose signs
    # depend on the BLAS thread count; the next round's Adam would turn them into lr-sized steps.
    if S.numel():
        S = torch.where(S > 1e-6 * S[0], S, torch.zeros_like(S))
    root = (S / scaling).sqrt()  # split σ/s evenly: (s·B) A = U diag(σ) Vh
    B = U * root  # (out, r)
    A = root[:, None] * Vh  # (r, in)
    energy = 1.0 if total == 0 else min(1.0, float((S * S).sum()) / total)
    return A.contiguous(), B.contiguous(), energy
