"""Planning for a user's own hardware: which block each client's memory budget holds, without building the model.

Everything here is arithmetic on a model's shapes (``model_shape``: a ``models.model_skeleton`` on the ``meta``
device, so a 7B model takes a second and no memory). The same formula prices an extracted block
(``analysis.block_costs`` feeds it the counts it measures on the block; a test holds the two equal):

- ``block_shapes``: the blocks of one pattern at several sparsities, as ``extract_blocks`` would cut them
  (unstructured: ``round(s * in)`` weights pruned per row; N:M: N of every M; structured: ``prune.structured_levels``
  with the smaller SLM config ``slm.slm_config`` builds).
- ``block_cost``: its bytes and forward FLOPs per token. Weights as legokit runs them: unstructured and N:M
  blocks are views of the LLM's weights (or copies of the same shape), so they hold every LLM weight plus a
  1-bit mask per linear weight; structured blocks are physically smaller models. ``sparse`` storage prices the
  kept values instead (what a sparse format with sparse kernels would hold). On top: the client's float32 LoRA
  factors (``models.lora_factor_bytes``) and its training state (their gradients and two AdamW moments);
  activations, which grow with batch size x sequence length, are not included.
- ``plan``: each budget's densest block per pattern (``densest_fit``), and ``parse_size`` for budgets such as
  ``512MiB`` or ``2GiB``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from legokit.models import config_skeleton, linear_modules, lora_factor_bytes, model_skeleton
from legokit.prune import n_pruned, parse_pattern, resolve_sparsity, structured_levels
from legokit.slm import attention_dims_of, slm_config
from legokit.utils import LegokitError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STORAGES = ("runtime", "sparse")  # weights as legokit runs a block | kept values only (sparse kernels)


@dataclass(frozen=True)
class ModelShape:
    """What the cost arithmetic needs of an LLM: shapes and counts, no weights."""

    name: str
    shapes: Mapping[str, tuple[int, int]]  # prunable linear modules, (out, in)
    params: int  # parameters, tied weights once
    numel: int  # parameters and buffers (rotary frequencies), as held in memory
    lm_head: int  # weights of the LM head (tied or not: it computes every token)
    layers: int
    heads: int
    head_dim: int
    config: object  # the transformers config (structured blocks derive their smaller one from it)

    @property
    def linear(self) -> int:
        """Weights of the prunable linear modules."""
        return sum(o * i for o, i in self.shapes.values())


def model_shape(model: str | nn.Module) -> ModelShape:
    """The ``ModelShape`` of a model name / checkpoint / config.json / preset (read on ``meta``), or of a model."""
    name = model if isinstance(model, str) else getattr(model, "name_or_path", type(model).__name__)
    net = model_skeleton(model) if isinstance(model, str) else model
    cfg = net.config
    params = sum(t.numel() for t in net.parameters())  # tied weights are one Parameter, listed once
    return ModelShape(name=str(name), shapes={n: tuple(m.weight.shape) for n, m in linear_modules(net).items()},
                      params=params, numel=params + sum(t.numel() for t in net.buffers()),
                      lm_head=net.get_output_embeddings().weight.numel(), layers=cfg.num_hidden_layers,
                      heads=attention_dims_of(cfg)["num_heads"], head_dim=attention_dims_of(cfg)["head_dim"],
                      config=cfg)


@dataclass(frozen=True)
class BlockShape:
    """One block's counts, measured on an extracted block or planned from shapes."""

    pattern: str
    sparsity: float
    kept: int  # linear weights the SLM computes with (structured: the size of its smaller matrices)
    mask_bytes: int  # packed keep-masks the client holds (unstructured / N:M; 0 for dense and structured)
    slm_shapes: Mapping[str, tuple[int, int]]  # the SLM's linear shapes, where its LoRA factors live
    heads: int  # attention heads per layer

    @property
    def structured(self) -> bool:
        return self.pattern == "structured" and self.sparsity > 0

    @property
    def id(self) -> str:
        """``dense`` or e.g. ``unstructured-50``, ``2:4-50``, ``structured-75``."""
        return "dense" if self.sparsity == 0 else f"{self.pattern}-{round(100 * self.sparsity)}"


def block_shapes(model: ModelShape, pattern: str, sparsities: Sequence[float],
                 nested: bool = True) -> list[BlockShape]:
    """The blocks ``extract_blocks`` would cut at ``sparsities`` (N:M patterns: 0 and N/M only), lowest first.

    Args:
        nested: one-shot calibration (structured sizes capped level by level, as ``extract_blocks`` does).
    """
    pat = parse_pattern(pattern)
    if pat.kind == "nm":
        sparsities = [s for s in sparsities if s == 0] + [pat.implied_sparsity]
        bad = [n for n, (_, i) in model.shapes.items() if i % pat.m]
        if bad:
            raise LegokitError(f"pattern {pattern!r} needs every input size to be a multiple of {pat.m}; "
                               f"{bad[0]} of {model.name} is {model.shapes[bad[0]]}: use another N:M or "
                               "'unstructured'")
    levels = sorted({resolve_sparsity(float(s), pat) for s in sparsities})
    packed = sum(math.ceil(o * i / 8) for o, i in model.shapes.values())  # pack_mask: 1 bit per weight
    sizes = {}
    if pat.kind == "structured":
        cfg = model.config
        sizes = structured_levels(levels, nested=nested, hidden=cfg.hidden_size,
                                  intermediate=cfg.intermediate_size, **attention_dims_of(cfg))
    out = []
    for s in levels:
        if s in sizes:  # the smaller model build_slm makes, on meta
            slm = {n: tuple(m.weight.shape)
                   for n, m in linear_modules(config_skeleton(slm_config(model.config, sizes[s]))).items()}
            out.append(BlockShape(str(pat), s, sum(o * i for o, i in slm.values()), 0, slm, sizes[s].heads))
            continue
        if s == 0:
            kept = model.linear
        elif pat.kind == "nm":
            kept = sum(o * i // pat.m * (pat.m - pat.n) for o, i in model.shapes.values())
        else:
            kept = sum(o * (i - n_pruned(s, i)) for o, i in model.shapes.values())
        out.append(BlockShape(str(pat), s, kept, packed if s > 0 else 0, dict(model.shapes), model.heads))
    return out


def check_settings(dtype: str = "float32", rank: int = 8, context: int = 256, storage: str = "runtime") -> None:
    """Raise ``LegokitError`` for an unknown dtype or storage, or a rank or context that is not a positive int."""
    if dtype not in DTYPE_BYTES:
        raise LegokitError(f"unknown dtype {dtype!r}: use one of {list(DTYPE_BYTES)}")
    if storage not in STORAGES:
        raise LegokitError(f"unknown storage {storage!r}: use one of {STORAGES}")
    for what, value, example in (("rank", rank, "the LoRA rank, e.g. 8"), ("context", context, "tokens, e.g. 256")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LegokitError(f"{what}={value!r}: give a positive integer ({example})")


def block_cost(model: ModelShape, block: BlockShape, *, dtype: str = "float32", rank: int = 8,
               context: int = 256) -> dict:
    """Bytes and forward FLOPs per token of one block on one client.

    Args:
        dtype: the weights' dtype (``DTYPE_BYTES``); LoRA factors and optimizer state are float32.
        rank: the client's LoRA rank (capped per module at ``min(out, in)``).
        context: tokens each generated token attends to (the attention term of the FLOPs).
    Returns:
        ``runs_as`` (dense | view or copy | smaller model), ``params`` (the SLM's nonzero parameters), bytes:
        ``weights`` (as legokit runs it: views and copies hold every LLM weight), ``sparse_weights`` (kept
        values only), ``masks``, ``lora`` (one float32 adapter), ``train_state`` (its gradients and two AdamW
        moments), ``total`` and ``sparse_total``; ``gflops_per_token`` = (2 x (kept linear + LM head) +
        4 x layers x heads x head_dim x context) / 1e9, and the dense LLM's ``dense_gflops_per_token``.
        Unstructured zeros only save FLOPs with sparse kernels.
    """
    check_settings(dtype, rank, context)
    elem = DTYPE_BYTES[dtype]
    other = model.numel - model.linear  # embeddings, norms, an untied LM head, buffers
    params = other + block.kept
    weights = params * elem if block.structured else model.numel * elem
    lora = lora_factor_bytes(dict(block.slm_shapes), rank)

    def flops(kept: int, heads: int) -> float:  # QK^T and AV: 2 FLOPs per MAC each
        return (2 * (kept + model.lm_head) + 4 * model.layers * heads * model.head_dim * context) / 1e9

    runs_as = "dense" if block.sparsity == 0 else "smaller model" if block.structured else "view or copy"
    tail = block.mask_bytes + 4 * lora  # masks, the factors, their gradients and two AdamW moments
    return {"runs_as": runs_as, "params": params, "weights": weights, "sparse_weights": params * elem,
            "masks": block.mask_bytes, "lora": lora, "train_state": 3 * lora, "total": weights + tail,
            "sparse_total": params * elem + tail, "gflops_per_token": flops(block.kept, block.heads),
            "dense_gflops_per_token": flops(model.linear, model.heads)}


def parse_size(text: str | int | float) -> int:
    """Bytes of a size such as ``512MiB``, ``2GiB``, ``1.5GB`` or a plain byte count."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text > 0:
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", str(text).lower())
    if m is None or m.group(2) not in UNITS or float(m.group(1)) <= 0:
        raise LegokitError(f"budget {text!r} is not a size: write a positive number with a unit, e.g. 512MiB, "
                           "2GiB, 1.5GB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * UNITS[m.group(2)])


def format_size(nbytes: float) -> str:
    """``1.23 GiB``, ``512.0 MiB``, ``3.0 KiB`` or ``12 B``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}" if unit == "GiB" else f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def densest_fit(costs: pd.DataFrame, budget: float, column: str) -> int | None:
    """Index of the densest row of ``costs`` (lowest ``sparsity``) whose ``column`` fits ``budget``, or None."""
    fitting = costs[costs[column] <= float(budget) * (1 + 1e-12)]
    return None if fitting.empty else int(fitting["sparsity"].idxmin())


def check_inputs(budgets: Sequence[str | int | float], *, sparsities: Sequence[float] = (0,),
                 patterns: Sequence[str] = ("unstructured",), rank: int = 8, context: int = 256,
                 dtype: str = "float32", storage: str = "runtime", names: Sequence[str] | None = None) -> list[int]:
    """Check ``plan``'s arguments before any model is read; returns the budgets in bytes."""
    check_settings(dtype, rank, context, storage)
    sizes = [parse_size(b) for b in budgets]
    if not sizes:
        raise LegokitError("no budgets: give at least one, e.g. 2GiB")
    if names is not None and len(names) != len(sizes):
        raise LegokitError(f"{len(names)} names for {len(sizes)} budgets: give one per client")
    if not patterns:
        raise LegokitError("no patterns: give at least one of unstructured, structured, N:M (e.g. 2:4)")
    for p in patterns:
        parse_pattern(p)
    if not sparsities:
        raise LegokitError("no sparsities: give at least one, e.g. 0,0.25,0.5,0.75")
    for x in sparsities:
        resolve_sparsity(x, "unstructured")  # in [0, 1); N:M patterns take 0 and N/M whatever is listed
    return sizes


def plan(model: str | ModelShape, budgets: Sequence[str | int | float], *,
         sparsities: Sequence[float] = (0, 0.25, 0.5, 0.75), patterns: Sequence[str] = ("unstructured", "structured"),
         rank: int = 8, context: int = 256, dtype: str = "float32", storage: str = "runtime",
         names: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Which block each budget holds: the dense block where it fits, else per pattern the densest that fits.

    Args:
        model: a name, checkpoint directory, config.json or shape preset (``models.model_config``), or its shape.
        budgets: each client's memory, as sizes (``parse_size``) or bytes.
        storage: ``runtime`` (weights as legokit runs the block) or ``sparse`` (kept values only).
        names: optional label per client (a device name).
    Returns:
        ``(blocks, clients)``: one row per block (``pattern, block, sparsity`` and its ``block_cost``; the dense
        block once, pattern ``dense``), and one row per client and pattern (``client, (device), budget, pattern``,
        the block's row, ``headroom``; one ``dense`` row where the dense block fits); a pattern with no block
        that fits gives ``block = None`` (``smallest_block`` says what the smallest needs).
    Raises:
        LegokitError: a bad argument, or budgets of which none fits any block (names the smallest's bytes).
    """
    sizes = check_inputs(budgets, sparsities=sparsities, patterns=patterns, rank=rank, context=context, dtype=dtype,
                         storage=storage, names=names)
    shape = model_shape(model) if isinstance(model, str) else model
    rows = {b.id: {"pattern": "dense" if b.sparsity == 0 else b.pattern, "block": b.id, "sparsity": b.sparsity,
                   **block_cost(shape, b, dtype=dtype, rank=rank, context=context)}
            for p in patterns for b in block_shapes(shape, p, sparsities)}  # the dense block once
    blocks = pd.DataFrame(list(rows.values()))
    column = "total" if storage == "runtime" else "sparse_total"
    clients = []
    for k, budget in enumerate(sizes):
        row = {"client": k, **({"device": names[k]} if names is not None else {}), "budget": budget}
        dense = densest_fit(blocks[blocks["pattern"] == "dense"], budget, column)
        for p in ["dense"] if dense is not None else dict.fromkeys(blocks["pattern"][blocks["pattern"] != "dense"]):
            i = densest_fit(blocks[blocks["pattern"].isin([p, "dense"])], budget, column)
            fit = {} if i is None else {**blocks.loc[i].to_dict(), "headroom": budget - int(blocks.loc[i, column])}
            clients.append({**row, "pattern": p, "block": None, **fit})
    clients = pd.DataFrame(clients)
    clients["block"] = clients["block"].astype(object).where(clients["block"].notna(), None)
    if clients["block"].isna().all():
        small = blocks.loc[blocks[column].idxmin()]
        raise LegokitError(f"no budget ({', '.join(format_size(b) for b in sizes)}) fits a block of {shape.name}; the "
                           f"smallest, {small['block']}, needs {format_size(small[column])} ({int(small[column])} "
                           f"bytes, {storage} storage): raise a budget to that, add a higher sparsity or the "
                           "structured pattern, or take a smaller dtype or rank")
    return blocks, clients


def smallest_block(blocks: pd.DataFrame, storage: str = "runtime") -> str:
    """A sentence naming the smallest block of ``plan``'s blocks and its bytes (for budgets that fit none)."""
    column = "total" if storage == "runtime" else "sparse_total"
    small = blocks.loc[blocks[column].idxmin()]
    return f"none fits: the smallest block, {small['block']}, needs {format_size(small[column])}"


def plan_report(model: str | ModelShape, budgets: Sequence[str | int | float], *, as_json: bool = False,
                **settings) -> str:
    """``plan`` as the ``legokit plan`` command prints it: a header, the clients' table and what fits none.

    Args:
        settings: ``plan``'s keyword arguments (sparsities, patterns, rank, context, dtype, storage, names).
        as_json: JSON instead: ``{"model", "params", "settings", "blocks", "clients"}`` with bytes as integers.
    """
    opts = {"sparsities": [0, 0.25, 0.5, 0.75], "patterns": ["unstructured", "structured"], "rank": 8,
            "context": 256, "dtype": "float32", "storage": "runtime", **settings}
    check_inputs(budgets, **opts)  # bad input before the model's config is read
    shape = model_shape(model) if isinstance(model, str) else model
    blocks, clients = plan(shape, budgets, **settings)
    if as_json:
        return json.dumps({"model": shape.name, "params": shape.params, "settings": opts,
                           "blocks": to_records(blocks), "clients": to_records(clients)}, indent=1)
    head = (f"{shape.name}: {shape.params / 1e9:.2f}B parameters ({shape.params}), {shape.layers} layers; weights in "
            f"{opts['dtype']}, {opts['storage']} storage ("
            + ("unstructured and N:M blocks run as views or copies of every LLM weight plus a 1-bit mask; structured "
               "blocks are smaller models" if opts["storage"] == "runtime" else
               "kept values plus a 1-bit mask per linear weight, as sparse kernels would hold them")
            + f"); LoRA rank {opts['rank']} in float32, its training state = gradients + two AdamW moments "
            f"(activations not included); forward GFLOPs per token at {opts['context']} tokens of context")
    lines = [head, "", plan_table(clients, opts["storage"])]
    if clients["block"].isna().any():
        lines += ["", smallest_block(blocks, opts["storage"])]
    return "\n".join(lines)


def plan_table(clients: pd.DataFrame, storage: str = "runtime") -> str:
    """The ``plan`` clients as text: sizes in KiB / MiB / GiB, one line per client and pattern."""
    total = "total" if storage == "runtime" else "sparse_total"
    weights = "weights" if storage == "runtime" else "sparse_weights"
    out = []
    for r in clients.to_dict("records"):
        none = pd.isna(r["block"])
        line = {"client": r["client"], **({"device": r["device"]} if "device" in r else {}),
                "budget": format_size(r["budget"]), "pattern": r["pattern"],
                "block": "none fits" if none else r["block"],
                "runs as": "" if none else "sparse format" if storage == "sparse" and r["masks"] else r["runs_as"]}
        for col, key in (("weights", weights), ("masks", "masks"), ("LoRA", "lora"),
                         ("train state", "train_state"), ("total", total), ("headroom", "headroom")):
            line[col] = "" if none else format_size(r[key])
        line["GFLOPs/token"] = "" if none else f"{r['gflops_per_token']:.3g}"
        out.append(line)
    return pd.DataFrame(out).to_string(index=False)


def to_records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts (numpy scalars as Python numbers, missing as None)."""
    return [{k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else
                 v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in frame.to_dict("records")]


def torch_dtype_name(dtype: torch.dtype) -> str:
    """The ``DTYPE_BYTES`` name of a torch dtype (``torch.float32`` -> ``float32``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise LegokitError(f"no plan for weights in {dtype}: use one of {list(DTYPE_BYTES)}")
    return name
