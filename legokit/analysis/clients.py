"""Client analyses (notebook 02): what each device holds and costs, what it trains on, how it trained and scores.

What each device holds and costs (``client_table``), which block a memory budget buys (``block_cost_table``,
``blocks_for_budgets``), what data it trains on (``task_mix``, ``main_task``), how its training went
(``read_metrics``, ``client_rounds``) and how its block scores before and after the federation
(``client_scores``, ``response_nll``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from legokit.analysis.aggregation import apply_delta, block_update
from legokit.blocks import sparsity_report
from legokit.client import examples_per_task
from legokit.data import TASKS, load_task, tokenize_example
from legokit.evaluate import evaluate_examples
from legokit.models import param_bytes
from legokit.names import DEVICE_PROFILES
from legokit.plan import BlockShape, block_cost, densest_fit, model_shape, torch_dtype_name
from legokit.slm import attention_dims, materialize
from legokit.train import IGNORE, make_batch
from legokit.utils import LegokitError, progress_bar


def block_costs(llm: nn.Module, block, context: int = 256) -> dict:
    """Memory and compute of one block's SLM, against the dense LLM (``plan.block_cost`` on measured counts).

    Args:
        llm: the LLM the block was cut from.
        block: a ``legokit.blocks.Block``.
        context: tokens of context each generated token attends to (the attention term of the FLOPs).
    Returns:
        ``{"linear_params", "kept_linear_params", "dense_mb", "sparse_mb", "block_mb", "gflops_per_token",
        "dense_gflops_per_token"}``. ``dense_mb``: every LLM parameter at its dtype. ``sparse_mb``: the SLM
        stored sparse (kept linear values + its packed 1-bit masks; structured SLMs are just smaller;
        embeddings and norms dense). ``block_mb``: what legokit itself keeps for the block (packed masks,
        overrides), the weights being derived from the LLM. FLOPs per token ≈ 2 × (kept linear params +
        LM head) + 4 × layers × attention width × context; unstructured zeros only save FLOPs with
        sparse kernels.
    """
    shape = model_shape(llm)
    counts = measured_shape(llm, block)
    cost = block_cost(shape, counts, dtype=torch_dtype_name(next(llm.parameters()).dtype), context=context)
    return {"linear_params": shape.linear, "kept_linear_params": counts.kept, "dense_mb": param_bytes(llm) / 2**20,
            "sparse_mb": (cost["sparse_weights"] + cost["masks"]) / 2**20, "block_mb": block.nbytes() / 2**20,
            "gflops_per_token": cost["gflops_per_token"], "dense_gflops_per_token": cost["dense_gflops_per_token"]}


def measured_shape(llm: nn.Module, block) -> BlockShape:
    """The counts ``plan.block_cost`` prices, measured on an extracted block (its masks, SLM shapes and sizes)."""
    rep = sparsity_report(block)  # one row per pruned linear module
    kept = int(rep["slm_params"].sum()) if block.structured else int(rep["kept"].sum())
    masks = 0 if block.structured or block.dense else sum(block.masks.stored_bytes(n) for n in block.shapes)
    heads = block.sizes.heads if block.sizes is not None else attention_dims(llm)["num_heads"]
    return BlockShape(pattern=block.pattern, sparsity=block.sparsity, kept=kept, mask_bytes=masks,
                      slm_shapes={n: block.coords.local_shape(n) for n in block.shapes}, heads=heads)


def client_table(llm: nn.Module, blocks: Sequence, assignment: Sequence[int],
                 partitions: Sequence[Sequence] | None = None, devices: Sequence[str] | None = None,
                 context: int = 256) -> pd.DataFrame:
    """One row per client: device (and its budget), assigned block, bytes and FLOPs per token.

    Args:
        assignment: block index per client (``legokit.federation.assign_blocks``).
        partitions: each client's training examples (adds ``examples`` and the ``main_task``).
        devices: each client's device profile name (``legokit.names.DEVICE_PROFILES``).
    """
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
        i = densest_fit(costs, float(budget) + 1e-9, "sparse_mb")
        if i is None:
            small = costs.loc[costs["sparse_mb"].idxmin()]
            unit = 10.0 ** (np.floor(np.log10(small["sparse_mb"])) - 3)  # round up to 4 significant digits
            raise LegokitError(
                f"{who}: a budget of {float(budget):g} MiB fits no block; the smallest, {small['block']}, needs "
                f"{small['sparse_mb']:.6g} MiB stored sparse. Raise the budget to at least "
                f"{np.ceil(small['sparse_mb'] / unit) * unit:.4g} MiB, or extract a sparser level "
                "(add it to prune.sparsities)")
        row = {"client": k, **({"device": devices[k]} if devices is not None else {}),
               "budget_mb": float(budget), "block_index": i, **costs.loc[i].to_dict()}
        rows.append({**row, "headroom_mb": float(budget) - float(costs.loc[i, "sparse_mb"])})
    return pd.DataFrame(rows)


def main_task(examples: Sequence) -> str:
    """The most frequent task among ``examples`` (ties: the first in task-name order)."""
    if not examples:
        raise LegokitError("no examples: a client without data has no main task")
    counts = examples_per_task(examples)
    return min(counts, key=lambda t: (-counts[t], t))


def task_mix(partitions: Sequence[Sequence], tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """Examples per client (rows) and task (columns), tasks in ``tasks`` order (default: sorted)."""
    counts = [examples_per_task(part) for part in partitions]
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
