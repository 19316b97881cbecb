"""Analysis helpers behind the pruning (01), client (02) and aggregation (03) notebooks.

Pruning: ``calibration_stats`` keeps what one dense calibration pass saw at some layers (input norms and
Hessians, as ``extract_blocks`` gathers them); from it, ``module_scores`` / ``module_masks`` give one module's
scores and nested masks per method, ``score_sample`` samples every method's score of the same weights,
``reconstruction_errors`` what a block costs each module's output, and ``mask_stats`` / ``kept_overlap`` /
``structured_kept`` describe masks.

Clients: what each device holds and costs (``client_table``), which block a memory budget buys
(``block_cost_table``, ``blocks_for_budgets``), what data it trains on (``task_mix``),
how its training went (``read_metrics``) and how its block scores before and after the federation
(``client_scores``, ``response_nll``).

Aggregation: the round loop keeps the last round's client updates (``LegoStrategy.last_results``, factors in
LLM coordinates). ``reaggregate`` replays every aggregator on those same updates, one module at a time,
so aggregators are compared on identical inputs without training again; ``aggregation_errors`` measures
each against an independent float64 owner mean (what HeteAgg computes; ``aggregator_detail`` gives one
module's matrices for a picture), ``energy_by_rank`` shows how
much of an aggregate a rank-r broadcast keeps, and ``apply_delta`` adds a global update to the LLM and
restores the weights bit for bit afterwards.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from legokit.aggregate import AGGREGATORS, ClientUpdate, coverage, get_aggregator
from legokit.slm import LinearView, materialize
from legokit.utils import LegokitError, progress_bar

# ============================================================================================ pruning


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
        return sorted({_layer_of(n) for n in self.act_norms})

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

    The windows (``prune.calibration_inputs``) and the hooks (``prune.InputStats``, through
    ``prune.layerwise_calibration``) are the ones ``extract_blocks`` uses in ``one_shot`` mode, so scores and
    masks computed from these statistics are the blocks'. Memory: one Hessian per distinct input of every
    observed layer (about 13 MiB per layer of the 135M default LLM); the pass stops after the last layer.
    """
    from legokit.prune import calibration_inputs, layerwise_calibration

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
    from legokit.prune import method_scores

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

    Magnitude and Wanda: ``prune.nested_masks`` of the scores. SparseGPT: ``prune.sparsegpt_prune`` level by
    level, lowest sparsity first, each inside the previous mask. So the masks are nested for every method.
    Returns one bool (out, in) mask per entry of ``sparsities``, in that order.
    """
    from legokit import prune

    prune.check_method(method)
    pat = prune.parse_pattern(pattern)
    levels = [prune.resolve_sparsity(s, pat) for s in sparsities]
    if method != "sparsegpt":
        return prune.nested_masks(module_scores(llm, stats, name, method, percdamp), levels, str(pat))
    if stats is None:
        raise LegokitError("sparsegpt masks need calibration statistics: pass calibration_stats(...)")
    w, H = llm.get_submodule(name).weight, stats.hessians[stats.check(name)]
    factor = prune.inverse_hessian_factor(H, percdamp)
    masks: dict[float, Tensor] = {}
    within = None
    for s in sorted(set(levels)):
        _, within = prune.sparsegpt_prune(w, H, s, str(pat), blocksize=blocksize, percdamp=percdamp,
                                          within=within, factor=factor)
        masks[s] = within
    return [masks[s] for s in levels]


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
    from legokit.prune import prune_mask

    layers = stats.layers if layers is None else list(layers)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name in stats.modules:
        if _layer_of(name) not in layers:
            continue
        out_f, in_f = llm.get_submodule(name).weight.shape
        flat = torch.randperm(out_f * in_f, generator=gen)[:n]  # (n,) the same weights for every method
        r, c = flat // in_f, flat % in_f
        for method in methods:
            scores = module_scores(llm, stats, name, method)  # (out, in)
            keep = prune_mask(scores, sparsity)  # by the score alone (SparseGPT's own mask also updates weights)
            rows.append(pd.DataFrame({"layer": _layer_of(name), "kind": name.rsplit(".", 1)[-1], "module": name,
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
        rows.append({"module": name, "layer": _layer_of(name), "kind": name.rsplit(".", 1)[-1],
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
    from legokit.prune import output_error
    from legokit.slm import slm_weight

    blocks = [blocks] if hasattr(blocks, "shapes") else list(blocks)
    rows = []
    for block in blocks:
        for name in stats.modules:
            if name not in block.shapes:
                raise LegokitError(f"block {block.id} has no module {name!r}: compute the stats on the block's LLM")
            w = block.llm.get_submodule(name).weight
            pruned = block.coords.expand(name, slm_weight(block, name, w))  # (out, in) LLM coordinates
            rows.append({"block": block.id, "module": name, "layer": _layer_of(name), "kind": name.rsplit(".", 1)[-1],
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
    from legokit.slm import attention_dims

    if not block.structured:
        raise LegokitError(f"block {block.id} is not structured: it keeps weights, not whole heads and channels")
    dims = attention_dims(block.llm)
    d = dims["head_dim"]
    by_kind: dict[str, dict[int, Tensor]] = {"q_proj": {}, "k_proj": {}, "gate_proj": {}}
    for name, (rows, _) in block.index.items():
        kind = name.rsplit(".", 1)[-1]
        if kind in by_kind:
            by_kind[kind][_layer_of(name)] = rows
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


# ============================================================================================ clients


def _layer_of(name: str) -> int:
    return next((int(p) for p in name.split(".") if p.isdigit()), -1)


def block_costs(llm: nn.Module, block, context: int = 256) -> dict:
    """Memory and compute of one block's SLM, against the dense LLM.

    Args:
        llm: the LLM the block was cut from.
        block: a ``legokit.blocks.Block``.
        context: tokens of context each generated token attends to (the attention term of the FLOPs).
    Returns:
        ``{"linear_params", "kept_linear_params", "dense_mb", "sparse_mb", "block_mb", "gflops_per_token",
        "dense_gflops_per_token"}``. ``dense_mb``: every LLM parameter at its dtype. ``sparse_mb``: the SLM
        stored sparse (kept linear values + a 1-bit mask per weight; structured SLMs are just smaller;
        embeddings and norms dense). ``block_mb``: what legokit itself keeps for the block (packed masks,
        overrides), the weights being derived from the LLM. FLOPs per token ≈ 2 × (kept linear params +
        LM head) + 4 × layers × attention width × context; unstructured zeros only save FLOPs with
        sparse kernels.
    """
    from legokit.blocks import sparsity_report
    from legokit.models import decoder_layers, param_bytes

    rep = sparsity_report(block)  # one row per pruned linear module
    elem = next(llm.parameters()).element_size()
    linear, kept, slm = int(rep["params"].sum()), int(rep["kept"].sum()), int(rep["slm_params"].sum())
    dense_bytes = param_bytes(llm)
    other_bytes = dense_bytes - linear * elem  # embeddings, norms (and an untied LM head)
    if block.structured:
        sparse_bytes = other_bytes + slm * elem
    elif block.dense:
        sparse_bytes = dense_bytes
    else:
        sparse_bytes = other_bytes + kept * elem + linear / 8
    cfg = llm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads = block.sizes.heads if block.sizes is not None else cfg.num_attention_heads
    lm_head = llm.get_output_embeddings().weight.numel()
    attention = 4 * len(decoder_layers(llm)) * heads * head_dim * context  # QKᵀ and AV, 2 FLOPs per MAC
    dense_attention = 4 * len(decoder_layers(llm)) * cfg.num_attention_heads * head_dim * context
    kept_linear = slm if block.structured else kept
    return {"linear_params": linear, "kept_linear_params": kept_linear, "dense_mb": dense_bytes / 2**20,
            "sparse_mb": sparse_bytes / 2**20, "block_mb": block.nbytes() / 2**20,
            "gflops_per_token": (2 * (kept_linear + lm_head) + attention) / 1e9,
            "dense_gflops_per_token": (2 * (linear + lm_head) + dense_attention) / 1e9}


def client_table(llm: nn.Module, blocks: Sequence, assignment: Sequence[int],
                 partitions: Sequence[Sequence] | None = None, devices: Sequence[str] | None = None,
                 context: int = 256) -> pd.DataFrame:
    """One row per client: device (and its budget), assigned block, bytes and FLOPs per token.

    Args:
        assignment: block index per client (``legokit.federation.assign_blocks``).
        partitions: each client's training examples (adds ``examples`` and the ``main_task``).
        devices: each client's device profile name (``legokit.names.DEVICE_PROFILES``).
    """
    from legokit.names import DEVICE_PROFILES

    costs = {i: block_costs(llm, blocks[i], context) for i in sorted(set(assignment))}
    rows = []
    for k, i in enumerate(assignment):
        row = {"client": k}
        if devices is not None:
            row.update(device=devices[k], budget=DEVICE_PROFILES[devices[k]])
        row.update(block=blocks[i].id, sparsity=blocks[i].sparsity)
        row.update(costs[i])
        if partitions is not None:
            row.update(examples=len(partitions[k]), main_task=main_task(partitions[k]))
        rows.append(row)
    return pd.DataFrame(rows)


def block_cost_table(llm: nn.Module, blocks: Sequence, context: int = 256) -> pd.DataFrame:
    """One row per block: ``block, sparsity`` and its :func:`block_costs` (MiB and GFLOPs per token)."""
    return pd.DataFrame([{"block": b.id, "sparsity": b.sparsity, **block_costs(llm, b, context)} for b in blocks])


def blocks_for_budgets(costs: pd.DataFrame, budgets_mb: Sequence[float],
                       devices: Sequence[str] | None = None) -> pd.DataFrame:
    """The block each client's memory budget buys: the densest block whose SLM, stored sparse, fits it.

    Args:
        costs: :func:`block_cost_table` of the extracted blocks.
        budgets_mb: each client's memory budget in MiB (compared with the block's ``sparse_mb``).
        devices: optional label per client (a device name), kept in a ``device`` column.
    Returns:
        one row per client: ``client, (device), budget_mb, block_index``, the block's cost columns, and
        ``headroom_mb`` (budget left over).
    Raises:
        LegokitError: a budget fits no block (the message names what the smallest block needs).
    """
    if devices is not None and len(devices) != len(budgets_mb):
        raise LegokitError(f"{len(devices)} device labels for {len(budgets_mb)} budgets: give one per client")
    rows = []
    for k, budget in enumerate(budgets_mb):
        who = f"client {k}" + (f" ({devices[k]})" if devices is not None else "")
        fitting = costs[costs["sparse_mb"] <= float(budget) + 1e-9]
        if fitting.empty:
            small = costs.loc[costs["sparse_mb"].idxmin()]
            unit = 10.0 ** (np.floor(np.log10(small["sparse_mb"])) - 3)  # round up to 4 significant digits
            raise LegokitError(
                f"{who}: a budget of {float(budget):g} MiB fits no block; the smallest, {small['block']}, needs "
                f"{small['sparse_mb']:.6g} MiB stored sparse. Raise the budget to at least "
                f"{np.ceil(small['sparse_mb'] / unit) * unit:.4g} MiB, or extract a sparser level "
                "(add it to prune.sparsities)")
        i = int(fitting["sparsity"].idxmin())  # the densest block that fits
        row = {"client": k, **({"device": devices[k]} if devices is not None else {}),
               "budget_mb": float(budget), "block_index": i, **costs.loc[i].to_dict()}
        rows.append({**row, "headroom_mb": float(budget) - float(costs.loc[i, "sparse_mb"])})
    return pd.DataFrame(rows)


def main_task(examples: Sequence) -> str:
    """The most frequent task among ``examples`` (ties: the first in task-name order)."""
    if not examples:
        raise LegokitError("no examples: a client without data has no main task")
    counts = Counter(ex.task for ex in examples)
    return min(counts, key=lambda t: (-counts[t], t))


def task_mix(partitions: Sequence[Sequence], tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """Examples per client (rows) and task (columns), tasks in ``tasks`` order (default: sorted)."""
    counts = [Counter(ex.task for ex in part) for part in partitions]
    cols = list(tasks) if tasks is not None else sorted({t for c in counts for t in c})
    df = pd.DataFrame([[c.get(t, 0) for t in cols] for c in counts], columns=cols)
    df.index.name = "client"
    return df


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """Per-step training losses of every client and round from a run's ``metrics.jsonl``.

    Columns: ``round, client, block, step`` (1-based within the round), ``global_step`` (steps counted
    over rounds), ``loss``. Failed clients have no rows.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LegokitError(f"{path} does not exist: point run_dir at a run directory (run_federation's)")
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        m = json.loads(line)
        losses = m.get("losses") or []
        for s, loss in enumerate(losses, start=1):
            rows.append({"round": m["round"], "client": m["client"], "block": m.get("block"), "step": s,
                         "global_step": (m["round"] - 1) * len(losses) + s, "loss": float(loss)})
    return pd.DataFrame(rows, columns=["round", "client", "block", "step", "global_step", "loss"])


def client_rounds(run_dir: str | Path) -> pd.DataFrame:
    """One row per client and round from a run's ``metrics.jsonl``, without the per-step losses.

    Columns include ``round, client, block, sparsity, num_examples, status, loss_first, loss_last,
    update_norm`` (‖s·B A‖_F over all modules, unmasked), ``seconds, tokens_per_second``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LegokitError(f"{path} does not exist: point run_dir at a run directory (run_federation's)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    drop = ("losses", "tasks", "traceback")
    return pd.DataFrame([{k: v for k, v in r.items() if k not in drop} for r in rows])


@torch.no_grad()
def response_nll(model: nn.Module, tokenizer, examples: Sequence, batch_size: int = 8) -> float:
    """Mean negative log-likelihood per response token (the training loss, without training)."""
    from legokit.data import tokenize_example
    from legokit.train import IGNORE, make_batch

    if not examples:
        raise LegokitError("response_nll needs at least one example")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    seqs = []
    for ex in examples:
        p, r = tokenize_example(ex, tokenizer)
        seqs.append((p + r, [IGNORE] * len(p) + r))
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(seqs), batch_size):
            batch = make_batch(seqs[b: b + batch_size], pad, pack=False, device=device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            keep = batch["targets"] != IGNORE  # (B, L)
            total += float(torch.nn.functional.cross_entropy(logits[keep].float(), batch["targets"][keep],
                                                             reduction="sum"))
            count += int(keep.sum())
    finally:
        model.train(was_training)
    return total / count


class LazyDeltas(Mapping):
    """A read-only ``{module: tensor}`` whose values are computed on access by ``fn(module)``."""

    def __init__(self, names: Sequence[str], fn):
        self.names, self.fn = list(names), fn

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.fn(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def block_update(strategy, block_index: int) -> Mapping[str, Tensor]:
    """The strategy's global update as the block applies it: ``M ⊙ s·B_g A_g`` in the SLM's coordinates.

    Lazy, one module per access. Adding it to the block's base weights (:func:`apply_delta`) gives the
    same model as ``federation.block_model`` (adapter mode) without a LoRA layer recomputing the masked
    product in every forward.
    """
    adapter = strategy.broadcast.adapter_for(None)
    if adapter is None:
        raise LegokitError("this run has no global adapter (merge mode folds the update into the blocks, `local` "
                           "keeps one adapter per client): use block.model as is")
    factors, scaling = adapter
    block = strategy.blocks[block_index]
    masked = not (block.dense or block.structured)

    def local(name: str) -> Tensor:
        a, b = factors[name]  # (r_g, in), (out, r_g) in LLM coordinates
        d = (b @ a).mul_(scaling)  # (out, in)
        if masked:
            d.mul_(block.masks[name])
        return block.coords.shrink(name, d)

    return LazyDeltas(list(factors), local)


def client_scores(strategy, tokenizer, partitions: Sequence[Sequence], other_task: str, n: int = 8,
                  split: str = "test", batch_size: int = 8, progress: bool = True) -> pd.DataFrame:
    """Each client's block on its own (main) task and on ``other_task``, before and after the federation.

    Before: the block's SLM as extracted (the broadcast's initial adapter has B = 0, so it adds nothing).
    After: the SLM with the strategy's global update applied through the block's mask (:func:`block_update`,
    the model ``federation.block_model`` gives). Metrics: response NLL for every task, accuracy for choice
    tasks (first ``n`` examples of ``split``). Blocks shared by several clients are scored once.

    Returns one row per (client, task, phase): ``client, block, task, role (own | other), phase
    (before | after), nll, accuracy``.
    """
    from legokit.data import TASKS, load_task
    from legokit.evaluate import evaluate_examples

    own = [main_task(p) for p in partitions]
    wanted: dict[int, set[str]] = {}
    for k, task in enumerate(own):
        wanted.setdefault(strategy.assignment[k], set()).update({task, other_task})
    data = {t: load_task(t, split)[:n] for t in sorted({t for ts in wanted.values() for t in ts})}

    def score(model, tasks) -> dict:
        out = {}
        for t in sorted(tasks):
            if TASKS[t].kind == "choice":  # one forward gives the accuracy and the same response NLL
                m = evaluate_examples(model, tokenizer, t, data[t], batch_size)
                out[t] = {"nll": m["nll"], "accuracy": m["accuracy"]}
            else:  # no generation: the NLL of the gold response only
                out[t] = {"nll": response_nll(model, tokenizer, data[t], batch_size), "accuracy": float("nan")}
        return out

    scored: dict[tuple[int, str], dict] = {}
    for i, tasks in progress_bar(sorted(wanted.items()), desc="score blocks", disable=not progress, leave=False):
        block = strategy.blocks[i]
        try:
            model = materialize(block.model)  # built once for both phases; copies, as apply_delta edits them
            scored[i, "before"] = score(model, tasks)
            with apply_delta(model, block_update(strategy, i)):
                scored[i, "after"] = score(model, tasks)
        finally:
            block.release()
    rows = []
    for k, task in enumerate(own):
        i = strategy.assignment[k]
        for role, t in (("own", task), ("other", other_task)):
            for phase in ("before", "after"):
                rows.append({"client": k, "block": strategy.blocks[i].id, "task": t, "role": role,
                             "phase": phase, **scored[i, phase][t]})
    return pd.DataFrame(rows)


# ========================================================================================= aggregation


def client_masks(strategy) -> list[Mapping[str, Tensor]]:
    """Every client's keep-masks (its block's ``masks``), in client order."""
    return [strategy.blocks[i].masks for i in strategy.assignment]


def client_updates(strategy, results: Sequence, names: Sequence[str] | None = None) -> list[ClientUpdate]:
    """The ``ClientUpdate`` of each result, as the strategy aggregates them (``LegoStrategy.updates``).

    Args:
        strategy: the federation's ``legokit.strategy.LegoStrategy`` (blocks, assignment, weighting rule).
        results: ``ClientResult`` list (``strategy.last_results``).
        names: modules to carry (default: all).
    """
    if not results:
        raise LegokitError("no client results: run a round first (strategy.last_results is empty)")
    return strategy.updates(results, names)


class AggregatedDeltas(Mapping):
    """Lazy ``{module: ΔW_g}`` of one aggregator over fixed client updates; each access aggregates one module.

    ``previous`` = None: coordinates no client owns get 0 (the round-1 value under ``"keep"``).
    """

    def __init__(self, strategy, results: Sequence, aggregator: str, names: Sequence[str] | None = None,
                 previous: Mapping[str, Tensor] | None = None):
        self.strategy, self.results, self.name = strategy, list(results), aggregator
        self.fn = get_aggregator(aggregator)
        self.names = list(strategy.modules if names is None else names)
        self.previous = previous
        client_updates(strategy, self.results, self.names[:1])  # fail fast on empty results

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(name)
        updates = client_updates(self.strategy, self.results, [name])
        prev = None if self.previous is None or name not in self.previous else {name: self.previous[name]}
        return self.fn(updates, prev, self.strategy.cfg.fed.uncovered)[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def reaggregate(strategy, results: Sequence, names: Sequence[str],
                aggregators: Sequence[str] = tuple(AGGREGATORS)) -> dict[str, dict[str, Tensor]]:
    """Every aggregator applied to the same client updates: ``{aggregator: {module: ΔW_g (out, in)}}``.

    Keep ``names`` to a few modules (each dense delta is out x in float32); for a whole model use
    :class:`AggregatedDeltas`, which computes one module at a time.
    """
    return {a: dict(AggregatedDeltas(strategy, results, a, names)) for a in aggregators}


def owner_mean(updates: Sequence[ClientUpdate], name: str) -> Tensor:
    """Reference HeteAgg in float64, client by client: ``Σ n_k M_k ΔW_k / Σ n_k M_k``, 0 where nobody owns.

    Written independently of ``legokit.aggregate`` so it can check it. Returns (out, in) float64.
    """
    num = den = None
    for u in updates:
        A, B = u.factors[name]  # (r, in), (out, r)
        m = u.masks[name].to(torch.float64)
        d = u.scaling * (B.double() @ A.double())  # (out, in)
        num = u.weight * m * d if num is None else num + u.weight * m * d
        den = u.weight * m if den is None else den + u.weight * m
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def aggregation_errors(strategy, results: Sequence, aggregators: Sequence[str] = tuple(AGGREGATORS),
                       names: Sequence[str] | None = None, progress: bool = True) -> pd.DataFrame:
    """How far each aggregator's ΔW_g is from the exact sample-weighted owner mean, module by module.

    Columns: ``module, layer, kind, aggregator, rel_error`` (‖ΔW_a − ref‖_F / ‖ref‖_F), ``norm_ratio``
    (‖ΔW_a‖ / ‖ref‖), ``dilution`` (⟨ΔW_a, ref⟩ / ‖ref‖² over the coordinates owned by some but not all
    clients: 1 = the owners' mean, < 1 = shrunk towards the pruned zeros; NaN when every coordinate is
    owned by all or none), ``partial_fraction`` (share of such coordinates). ``ref`` = :func:`owner_mean`.
    """
    names = list(strategy.modules if names is None else names)
    fns = {a: get_aggregator(a) for a in aggregators}
    rows = []
    for name in progress_bar(names, desc="aggregation errors", disable=not progress, leave=False):
        updates = client_updates(strategy, results, [name])
        ref = owner_mean(updates, name)
        owners = sum(u.masks[name].to(torch.int32) for u in updates)  # (out, in)
        partial = (owners > 0) & (owners < len(updates))
        ref_norm = float(torch.linalg.vector_norm(ref))
        ref_p = ref[partial]
        for a, fn in fns.items():
            d = fn(updates, None, strategy.cfg.fed.uncovered)[name].double()
            dp = d[partial]
            denom = float(ref_p @ ref_p)
            rows.append({"module": name, "layer": _layer_of(name), "kind": name.rsplit(".", 1)[-1],
                         "aggregator": a,
                         "rel_error": float(torch.linalg.vector_norm(d - ref)) / max(ref_norm, 1e-30),
                         "norm_ratio": float(torch.linalg.vector_norm(d)) / max(ref_norm, 1e-30),
                         "dilution": float(dp @ ref_p) / denom if denom > 0 else float("nan"),
                         "partial_fraction": float(partial.double().mean())})
    return pd.DataFrame(rows)


def aggregator_detail(strategy, results: Sequence, aggregator: str, module: str) -> dict:
    """One aggregator's ΔW_g on one module beside the exact owner mean (what ``widgets.aggregator_explorer`` draws).

    Returns:
        ``{"delta": ΔW_g (out, in) float64, "reference": owner_mean (out, in) float64, "coverage": int32
        (out, in) owners among the results' clients, "errors": that module's row of aggregation_errors}``.
    """
    if module not in strategy.modules:
        raise LegokitError(f"unknown module {module!r}: use one of strategy.modules (e.g. {strategy.modules[0]!r})")
    updates = client_updates(strategy, results, [module])
    errors = aggregation_errors(strategy, results, [aggregator], [module], progress=False)
    return {"delta": AggregatedDeltas(strategy, results, aggregator, [module])[module].double(),
            "reference": owner_mean(updates, module), "coverage": coverage([u.masks for u in updates], module),
            "errors": errors.iloc[0].to_dict()}


def energy_by_rank(delta: Tensor, ranks: Sequence[int]) -> np.ndarray:
    """Energy a rank-r truncated SVD keeps, ``Σ_{i<r} σ_i² / Σ σ_i²``, for each r in ``ranks``.

    Ranks above ``min(out, in)`` keep everything (1.0); a zero matrix keeps 1.0 (as ``svd_refactor``).
    """
    if any(int(r) < 1 for r in ranks):
        raise LegokitError(f"ranks must be >= 1, got {list(ranks)}")
    s2 = torch.linalg.svdvals(delta.detach().to(torch.float64)) ** 2  # (min(out, in),)
    total = float(s2.sum())
    if total == 0:
        return np.ones(len(ranks))
    cum = (torch.cumsum(s2, 0) / total).numpy()
    return np.array([1.0 if int(r) >= len(cum) else min(1.0, float(cum[int(r) - 1])) for r in ranks])


def coverage_table(masks: Sequence[Mapping[str, Tensor]], names: Sequence[str] | None = None) -> pd.DataFrame:
    """Per module: ``module, layer, kind, mean_owners`` and ``owners_<c>`` = fraction of coordinates owned
    by exactly ``c`` of the K clients (c = 0..K)."""
    if not masks:
        raise LegokitError("no client masks given: pass at least one client")
    names = list(masks[0] if names is None else names)
    K = len(masks)
    rows = []
    for name in names:
        cov = coverage(masks, name)  # (out, in) int32 in [0, K]
        frac = torch.bincount(cov.reshape(-1).long(), minlength=K + 1).double() / cov.numel()
        row = {"module": name, "layer": _layer_of(name), "kind": name.rsplit(".", 1)[-1],
               "mean_owners": float(cov.double().mean())}
        row.update({f"owners_{c}": float(frac[c]) for c in range(K + 1)})
        rows.append(row)
    return pd.DataFrame(rows)


def update_norm_table(updates: Sequence[ClientUpdate], masked: bool = True) -> pd.DataFrame:
    """Long table ``client, module, layer, kind, norm`` of ‖M_k ⊙ ΔW_k‖_F (``aggregate.update_norms``)."""
    from legokit.aggregate import update_norms

    rows = [{"client": c, "module": n, "layer": _layer_of(n), "kind": n.rsplit(".", 1)[-1], "norm": v}
            for c, per in update_norms(list(updates), masked=masked).items() for n, v in per.items()]
    return pd.DataFrame(rows)


@contextmanager
def apply_delta(model: nn.Module, deltas: Mapping[str, Tensor], progress: bool = False) -> Iterator[nn.Module]:
    """Within the block, ``W += ΔW`` for every module in ``deltas``; the original weights come back exactly.

    ``deltas`` may be lazy (:class:`AggregatedDeltas`): each module is computed, added and dropped in turn.
    Memory: one copy of the touched weights (restored by copy, not by subtraction, so bit-exact).
    """
    saved: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            for name in progress_bar(list(deltas), desc="apply ΔW", disable=not progress, leave=False):
                mod = model.get_submodule(name)
                if isinstance(mod, LinearView):
                    raise LegokitError(f"{name} is a view of the LLM's weight: call legokit.slm.materialize(model) "
                                       "before apply_delta")
                w = mod.weight
                d = deltas[name]
                if tuple(d.shape) != tuple(w.shape):
                    raise LegokitError(f"delta for {name} has shape {tuple(d.shape)}, the weight {tuple(w.shape)}")
                saved[name] = w.detach().clone()
                w += d.to(w.device, w.dtype)
        yield model
    finally:
        with torch.no_grad():
            for name, w0 in saved.items():
                model.get_submodule(name).weight.copy_(w0)
