"""One client's local LoRA training: fixed steps, loss on response tokens only, padding-free batches.

A step packs its sequences into one row whose ``position_ids`` restart at 0 for every sequence, so no
padding is computed. Attention must then stay inside each sequence. transformers' own mask builder
does that from the restarting ``position_ids`` (``masking_utils.find_packed_sequence_indices`` makes
a block-diagonal causal mask when no ``attention_mask`` is given), but sdpa then computes the full
``T x T`` score matrix of the packed row. ``train_client`` instead switches sdpa/eager models to a
per-sequence causal sdpa (``packed_attention``) fed by the flash-attention style ``cu_seq_lens``
kwargs the batch carries; flash-attention models use those kwargs natively. ``tests/test_train.py``
checks that both packed routes give the per-sequence loss and gradients. Logits are computed only at
positions that predict a response token (``logits_to_keep``), which skips most of the vocabulary
projection on prompt-heavy data. ``pack=False`` gives right-padded batches instead.

On a GPU legokit's part of a step reads one pair of numbers back to the host (the loss and the gradient norm,
checked before the optimizer steps): a batch's positions, targets and sequence bounds are computed on the CPU
when it is made and uploaded without waiting, and masks are unpacked on the device. (transformers' own check
for packed sequences reads one flag per forward.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from legokit.config import TrainConfig
from legokit.utils import LegokitError, progress_bar

IGNORE = -100
VARLEN_ATTENTION = "legokit_varlen_sdpa"


@dataclass
class TrainResult:
    """What one client's local training did."""

    losses: list[float] = field(default_factory=list)  # mean response-token loss per step
    steps: int = 0
    tokens: int = 0  # every real (non-padding) token processed
    response_tokens: int = 0  # tokens the loss is computed on
    seconds: float = 0.0
    num_examples: int = 0
    tokens_per_second: float = 0.0
    response_tokens_per_second: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def make_batch(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int, pack: bool = True,
               device: torch.device | str | None = None) -> dict:
    """Model inputs plus next-token ``targets`` for a list of ``(input_ids, labels)`` pairs.

    Targets are shifted per sequence (the last token of a sequence predicts nothing), so packing never
    trains a token to predict the next sequence. ``pack=True``: one row ``(1, T_total)`` with restarting
    ``position_ids``, no attention mask, and the sequence boundaries as ``cu_seq_lens_q/k`` (cumulative
    lengths, as flash-attention's varlen kernels take them); ``pack=False``: right-padded ``(B, L)`` with
    ``attention_mask``. ``loss_targets`` (the targets at those positions) and ``n_targets`` (their count)
    come with both; a packed batch's ``logits_to_keep`` holds the positions that have a target. The CPU works
    these out, so the loss needs no device-to-host read.
    """
    if not seqs:
        raise LegokitError("make_batch needs at least one sequence")
    ids = [list(s[0]) for s in seqs]
    tgts = [list(s[1][1:]) + [IGNORE] for s in seqs]  # targets[t] = labels[t + 1]
    if pack:
        lengths = [len(s) for s in ids]
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)  # (n + 1,)
        batch = {
            "input_ids": torch.tensor([sum(ids, [])]),  # (1, T)
            "position_ids": torch.tensor([[p for s in ids for p in range(len(s))]]),  # (1, T)
            "targets": torch.tensor([sum(tgts, [])]),  # (1, T)
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
        }
        extra = {"max_length_q": max(lengths), "max_length_k": max(lengths)}
    else:
        L = max(len(s) for s in ids)
        batch = {
            "input_ids": torch.tensor([s + [pad_id] * (L - len(s)) for s in ids]),  # (B, L)
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in ids]),
            "targets": torch.tensor([t + [IGNORE] * (L - len(t)) for t in tgts]),
        }
        extra = {}
    keep = batch["targets"] != IGNORE  # (B, T) bool
    batch["loss_targets"] = batch["targets"][keep]  # (n,), row-major as logits[keep] orders them
    if pack:  # positions (1D) gather the kept rows without reading the mask back from a GPU
        batch["logits_to_keep"] = keep[0].nonzero().view(-1)  # (n,)
    extra["n_targets"] = int(keep.sum())
    if device is not None:
        batch = {k: _upload(v, torch.device(device)) for k, v in batch.items()}
    if pack:  # the varlen attention reads the bounds from here, not back from the device
        for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
            _BOUNDS[batch[key]] = cu.tolist()
    return {**batch, **extra}


def _upload(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; to CUDA from pinned memory without blocking (a pageable copy waits for the GPU)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_BOUNDS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # cu_seq_lens tensor -> its bounds as a Python list


def _bounds(cu: Tensor) -> list[int]:
    """``cu.tolist()``, known from ``make_batch`` (or read once per batch): a read of a GPU tensor waits for it."""
    if cu not in _BOUNDS:
        _BOUNDS[cu] = cu.tolist()
    return _BOUNDS[cu]


def _varlen_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                 dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                 **kwargs) -> tuple[Tensor, None]:
    """Causal sdpa run separately on each packed sequence: no ``T x T`` mask, no cross-sequence scores."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        raise LegokitError(f"attention {VARLEN_ATTENTION!r} needs one packed row and cu_seq_lens_q; it is "
                           "meant for train_client only (set the model's attention back to 'sdpa')")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # GQA: (1, Hkv, T, D) -> (1, H, T, D), the head order of transformers' repeat_kv
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bounds = _bounds(cu)
    outs = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                           dropout_p=dropout, scale=scaling, is_causal=True)  # (1, H, L_i, D)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None  # (1, T, H, D)


@contextmanager
def packed_attention(model: nn.Module) -> Iterator[bool]:
    """Within the block, an sdpa/eager model attends per packed sequence (``cu_seq_lens``); restored after.

    Yields whether the attention was switched (flash-attention and other kernels are left alone).
    """
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None)
    switch = old in ("sdpa", "eager")
    if switch:
        from transformers import AttentionInterface

        AttentionInterface.register(VARLEN_ATTENTION, _varlen_sdpa)
        config._attn_implementation = VARLEN_ATTENTION
    try:
        yield switch
    finally:
        if switch:
            config._attn_implementation = old


def batch_loss(model: nn.Module, batch: dict) -> tuple[Tensor, int]:
    """Mean cross-entropy over the batch's response tokens and their count.

    Logits are projected only where a target exists: ``make_batch``'s ``logits_to_keep`` positions (packed),
    else a bool ``logits_to_keep``, flattened by transformers to ``(n, vocab)``. A batch without
    ``loss_targets`` / ``n_targets`` (edited by hand) has them worked out here from ``targets``.
    """
    inputs = {k: v for k, v in batch.items() if k not in _LOSS_KEYS}
    keep = batch.get("logits_to_keep")
    if keep is None:
        keep = batch["targets"] != IGNORE  # (B, T) bool
    if "loss_targets" in batch:
        targets, n = batch["loss_targets"], batch["n_targets"]
    else:  # a batch made by hand: a bool keep
        targets, n = batch["targets"][keep], int(keep.sum())
    if n == 0:
        raise LegokitError("the batch has no response tokens to train on (all labels are -100)")
    # use_cache=False matters: with a cache transformers skips the packed-sequence mask detection
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (n, vocab) or (1, n, vocab)
    logits = logits.reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(logits.float(), targets, reduction="sum") / n
    return loss, n


_LOSS_KEYS = ("targets", "loss_targets", "n_targets", "logits_to_keep")  # the loss's, not the model's inputs


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Example indices of every step: the data cycled in a seeded order, reshuffled each pass."""
    gen = torch.Generator().manual_seed(seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat += torch.randperm(n, generator=gen).tolist()
    return [flat[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Activation checkpointing on / off (transformers 5 renamed ``gradient_checkpointing_*`` to
    ``activation_checkpointing_*`` and warns on the old names; both do the same)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def adamw(params: Sequence[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """The AdamW of ``train_client`` over ``params``, which must be float32 (or float64).

    Mixed precision: a half-precision base (bfloat16 on CUDA) keeps float32 LoRA factors (``attach_lora``
    makes them so), and AdamW's moments take their parameters' dtype, so the optimizer state is float32 too.
    A half-precision trainable parameter is refused: with 8 (bfloat16) or 11 (float16) significant bits, an
    update much smaller than the weight would be rounded away.
    """
    half = [p for p in params if p.dtype in (torch.float16, torch.bfloat16)]
    if half:
        raise LegokitError(f"{len(half)} trainable parameter(s) are {half[0].dtype}: train float32 LoRA factors "
                           "(legokit.lora.attach_lora makes them float32 on a half-precision base)")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_client(model: nn.Module, tokenizer, examples: Sequence, cfg: TrainConfig, *, seed: int,
                 client: str = "client", round_idx: int = 0, device: torch.device | str | None = None,
                 progress: bool = True, pack: bool = True) -> TrainResult:
    """Train the model's trainable parameters (the LoRA factors) for ``cfg.local_steps`` steps.

    Args:
        model: a causal LM with LoRA attached (``legokit.lora.attach_lora``); only parameters with
            ``requires_grad`` are optimised.
        tokenizer: its tokenizer (``legokit.data.encode`` renders and tokenises each example).
        examples: the client's ``legokit.data.Example`` list, cycled in a seeded shuffled order.
        cfg: steps, batch size, AdamW lr / weight decay, gradient clipping, max length.
        seed: same seed, same data, same model -> bit-identical factors.
        client, round_idx: named in progress bars and error messages.
        device: move the model there first (default: where its parameters are).
        progress: show a progress bar.
        pack: padding-free packed batches (default) or right-padded ones.
    Returns:
        a ``TrainResult``; the model is left in the train/eval mode it came in.
    Raises:
        LegokitError: no examples, nothing trainable, or a non-finite loss / gradient (names client,
            round and step).
    """
    from legokit.data import encode

    if len(examples) == 0:
        raise LegokitError(f"client {client!r} has no training examples: give it at least one")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LegokitError(f"client {client!r}: the model has no trainable parameters; "
                           "call attach_lora first")
    if device is not None:
        model.to(device)
    dev = params[0].device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = batch_order(len(examples), cfg.local_steps, cfg.batch_size, seed)
    # only the examples the steps reach (a large client with few local steps uses a fraction)
    reached = sorted({i for b in order for i in b})
    encoded = {i: encode(examples[i], tokenizer, cfg.max_len, cfg.format) for i in reached}

    opt = adamw(params, cfg)
    result = TrainResult(num_examples=len(examples))
    was_training = model.training
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    bar = progress_bar(total=cfg.local_steps, desc=f"train {client} r{round_idx}", disable=not progress, leave=False)
    start = time.perf_counter()
    try:
        model.train()
        if cfg.gradient_checkpointing:
            _checkpointing(model, True)
        attention = packed_attention(model) if pack else nullcontext()
        with torch.random.fork_rng(devices=rng_devices), attention:  # dropout draws from a seeded stream
            torch.manual_seed(seed)
            for step in range(cfg.local_steps):
                seqs = [encoded[i] for i in order[step]]
                batch = make_batch(seqs, pad_id, pack=pack, device=dev)
                loss, n_resp = batch_loss(model, batch)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                # the step's one read from the device: both checks before the optimizer may apply the step
                value, norm_value = torch.stack([loss.detach().float(), norm.float()]).tolist()
                if not math.isfinite(value):
                    raise LegokitError(f"client {client!r}, round {round_idx}, step {step}: the loss is "
                                       f"{value}; lower train.lr (now {cfg.lr}) or check the block's "
                                       "weights and data")
                if not math.isfinite(norm_value):
                    raise LegokitError(f"client {client!r}, round {round_idx}, step {step}: the gradient "
                                       f"norm is {norm_value}; lower train.lr (now {cfg.lr}) or check "
                                       "the data")
                opt.step()
                opt.zero_grad(set_to_none=True)
                result.losses.append(value)
                result.tokens += sum(len(s[0]) for s in seqs)
                result.response_tokens += n_resp
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}")
    finally:
        bar.close()
        if cfg.gradient_checkpointing:
            _checkpointing(model, False)
        model.train(was_training)
        for p in params:  # a failed step must not leave gradients behind
            p.grad = None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    result.seconds = time.perf_counter() - start
    result.steps = len(result.losses)
    result.tokens_per_second = result.tokens / max(result.seconds, 1e-9)
    result.response_tokens_per_second = result.response_tokens / max(result.seconds, 1e-9)
    return result
