"""Calibration: the token windows pruning is calibrated on, and the statistics of each layer's inputs.

``calibration_inputs`` turns texts into token windows; ``InputStats`` is the hook object (removed on exit)
collecting per-input norms (Wanda) and Hessians X^T X (SparseGPT); ``layerwise_calibration`` runs the
windows through the decoder one layer at a time, so memory is bounded by one layer's statistics, either
dense (``one_shot``) or through the already pruned earlier layers (``sequential``). Each layer runs with the
arguments the model itself hands it (a sliding-window layer its own mask and rotary table, as Gemma 3's).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from legokit.data import bos_prefix
from legokit.models import decoder_layers, linear_modules
from legokit.utils import LegokitError, progress_bar


def calibration_inputs(tokenizer, texts: Iterable[str], n_calib: int, seq_len: int,
                       seed: int = 0) -> torch.Tensor:
    """Token windows for calibration: the texts joined by EOS, cut into up to ``n_calib`` windows.

    Windows are consecutive and non-overlapping, from a seeded offset; a tokenizer that starts every text
    with BOS (``bos_prefix``: Gemma's) gets it at the start of every window, in place of one text token.
    Fewer than ``n_calib`` come back when the texts are short (one shorter window when they hold less than
    ``seq_len`` tokens).
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
    pre = torch.tensor(bos_prefix(tokenizer), dtype=torch.long)
    step = seq_len - len(pre)  # text tokens per window
    if len(ids) < step:
        return torch.cat([pre, ids])[None, :]
    k = min(n_calib, len(ids) // step)
    gen = torch.Generator().manual_seed(seed)
    start = int(torch.randint(0, len(ids) - k * step + 1, (1,), generator=gen))
    windows = ids[start:start + k * step].reshape(k, step)
    return torch.cat([pre.expand(k, len(pre)), windows], dim=1)


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


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during the capture pass: records the keyword arguments the model
    hands that layer (its attention mask and rotary table: sliding-window and full layers get different ones)
    and passes the hidden states through; the last one stops the forward pass."""

    def __init__(self, index: int, last: bool, hidden: list, kwargs: list[list]):
        super().__init__()
        self.index, self.last, self.hidden, self.kwargs = index, last, hidden, kwargs

    def forward(self, hidden_states, **kw):
        if self.index == 0:
            self.hidden.append(hidden_states)
        self.kwargs[self.index].append(kw)
        if self.last:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def _capture_inputs(llm: nn.Module, input_ids: torch.Tensor, batch_size: int,
                    upto: int) -> tuple[list, list[list[dict]]]:
    """The hidden states entering decoder layer 0, one entry per batch, and the keyword arguments each decoder
    layer up to ``upto`` gets, ``kwargs[layer][batch]``. No decoder layer runs: recorders stand in for them."""
    decoder = decoder_layers(llm)
    hidden: list = []
    kwargs: list[list[dict]] = [[] for _ in range(upto + 1)]
    device = next(llm.parameters()).device
    originals = list(decoder)
    try:
        for i in range(upto + 1):
            decoder[i] = _Recorder(i, i == upto, hidden, kwargs)
        for i in range(0, len(input_ids), batch_size):
            try:
                llm(input_ids=input_ids[i:i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, layer in enumerate(originals[:upto + 1]):
            decoder[i] = layer
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
    decoder = decoder_layers(llm)
    prefix = next(n for n, m in llm.named_modules() if m is decoder)
    chosen = set(range(len(decoder))) if layers is None else {int(i) for i in layers}
    if not chosen or not chosen <= set(range(len(decoder))):
        raise LegokitError(f"layers={sorted(chosen)} must be a non-empty subset of the decoder layers "
                           f"0..{len(decoder) - 1}")
    hidden, layer_kwargs = _capture_inputs(llm, input_ids, batch_size, max(chosen))
    for i, layer in enumerate(progress_bar(decoder[:max(chosen) + 1], desc=desc, disable=not progress,
                                           leave=False)):
        kwargs = layer_kwargs[i]
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
