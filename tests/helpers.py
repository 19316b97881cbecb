"""Helpers shared by the unit tests: calibration texts, an example factory, the tiny experiment config, random
token ids and LoRA factors, a masked-LoRA forward and backward, and the tiny federation (its blocks, runs and
hand-made client results).

Plain functions and constants, no fixtures (those are in ``conftest.py``): ``from helpers import ...``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from legokit.blocks import extract_blocks
from legokit.config import ExperimentConfig, LoraConfig
from legokit.data import Example
from legokit.federation import run_federation
from legokit.lora import attach_lora, lora_modules
from legokit.messages import ClientResult
from legokit.models import linear_modules, load_model
from legokit.strategy import LegoStrategy, build_strategy

# Calibration texts short enough for tiny-llama's 32-token sequences (two distinct paragraphs, twice).
CALIB = ["The quick brown fox jumps over the lazy dog. " * 4, "Paris is the capital of France. " * 4] * 2


def river_paragraphs(n: int) -> list[str]:
    """``n`` distinct calibration paragraphs (a numbered sentence about the river Avon, three times)."""
    return [f"Paragraph {i}: the river Avon flows past mill number {i * 7} towards the old stone bridge." * 3
            for i in range(n)]


def make_examples(task: str, n: int) -> list[Example]:
    """``n`` generative examples of ``task`` (``"... what is i plus i?"`` answered ``2i``), uids ``task-i``."""
    return [Example(task=task, prompt=f"{task} question {i}: what is {i} plus {i}?", response=str(2 * i),
                    uid=f"{task}-{i}") for i in range(n)]


def tiny_config(**sections) -> ExperimentConfig:
    """The tiny two-client, two-round experiment on tiny-llama (blocks at 0 and 50%, rank 2, 2 local steps).

    Each keyword names a config section: a dict is merged into that section's defaults here (``fed={"rounds":
    1}`` keeps ``num_clients=2``), anything else replaces it (``device="cpu"``).
    """
    base = {
        "model": "tiny-llama",
        "prune": {"sparsities": [0.0, 0.5], "n_calib": 4, "seq_len": 32},
        "lora": {"rank": 2, "alpha": 4.0},
        "train": {"local_steps": 2, "batch_size": 2, "max_len": 64, "lr": 0.01},
        "fed": {"num_clients": 2, "rounds": 2},
        "data": {"tasks": ["boolq", "asdiv"], "train_examples": 8},
        "eval": {"base": False},
    }
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return ExperimentConfig.from_dict(base)


def have_data(tasks=("boolq", "asdiv")) -> bool:
    """Whether the prepared task data (``legokit setup``) holds the training split of every task in ``tasks``."""
    try:
        from legokit.data import load_task

        return all(load_task(t, "train") for t in tasks)
    except Exception:
        return False


def token_ids(n: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    """``(n, length)`` seeded random token ids inside tiny-llama's vocabulary (above its special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n, length), generator=g)


def random_factors(model: nn.Module, rank_of, seed: int = 1, std: float = 0.1) -> dict:
    """Seeded random LoRA factors ``{module: (A (r, in), B (out, r))}`` for every linear module of ``model``;
    ``rank_of(i)`` gives the i-th module's rank."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (n, m) in enumerate(linear_modules(model).items()):
        r = rank_of(i)
        out[n] = (torch.randn(r, m.in_features, generator=g) * std,
                  torch.randn(m.out_features, r, generator=g) * std)
    return out


def lora_forward_backward(model: nn.Module, ids: torch.Tensor, masks, lora_cfg: LoraConfig) -> tuple:
    """Attach seeded masked LoRA (B random, so the adapter takes part), run forward and backward on ``ids``.

    Returns ``(logits, loss, {parameter: gradient})`` (the gradients of the LoRA factors)."""
    attach_lora(model, lora_cfg, masks=masks, seed=3)
    for layer in lora_modules(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02, generator=torch.Generator().manual_seed(4))
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


# ----- the tiny federation: blocks, runs, hand-made results ---------------------------------------------------
def extract_tiny_blocks(llm, tok) -> list:
    """Wanda blocks of ``llm`` at 0 and 50% (one-shot on ``CALIB``): the tiny federation's two bricks."""
    return extract_blocks(llm, tok, sparsities=(0.0, 0.5), method="wanda", pattern="unstructured",
                          calibration="one_shot", n_calib=4, seq_len=32, seed=0, texts=CALIB)


def fresh_setup():
    """A new tiny-llama and blocks, for runs that change them (merge mode) or must start from scratch."""
    llm, tok = load_model("tiny-llama", device="cpu")
    return llm, tok, extract_tiny_blocks(llm, tok)


PARTS = [make_examples("boolq", 4), make_examples("asdiv", 4)]  # the two clients' training data


def global_delta(strategy: LegoStrategy) -> dict:
    """The global ΔW_g per module, (out, in), of an adapter-mode strategy."""
    factors, scaling = strategy.broadcast.adapter_for(None)
    return {n: scaling * (b @ a) for n, (a, b) in factors.items()}


def run_tiny(cfg, llm, tok, blocks, parts, run_dir, **kwargs) -> LegoStrategy:
    """``run_federation`` without progress bars; returns the finished strategy."""
    return run_federation(cfg, llm, tok, blocks, parts, run_dir, progress=False, **kwargs).strategy


def random_results(llm, counts, seed: int = 0, rank: int = 2, scaling: float = 2.0) -> list[ClientResult]:
    """Hand-made client results: random factors (the same for a given seed, whatever the counts)."""
    gen = torch.Generator().manual_seed(seed)
    return [ClientResult(client=k, scaling=scaling, num_examples=n,
                         factors={name: (torch.randn(rank, m.in_features, generator=gen),
                                         torch.randn(m.out_features, rank, generator=gen))
                                  for name, m in linear_modules(llm).items()})
            for k, n in enumerate(counts)]


def aggregated(setup_llm, counts, order=None, **fed) -> LegoStrategy:
    """A strategy after aggregating hand-made results of ``counts`` (in client ``order``, default 0, 1, ...);
    ``fed`` overrides the tiny config's ``fed`` section."""
    llm, _, blocks = setup_llm
    strategy = build_strategy(tiny_config(fed=fed), llm, blocks, progress=False)
    results = random_results(llm, counts)
    strategy.aggregate(1, [results[k] for k in (order or range(len(counts)))])
    return strategy


@contextmanager
def no_host_sync(device: torch.device) -> Iterator[None]:
    """On CUDA, any operation inside that waits for the GPU (a read back to the host, a pageable copy) raises
    (``torch.cuda.set_sync_debug_mode("error")``); on other devices it checks nothing."""
    if device.type != "cuda":
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)
