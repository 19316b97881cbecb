"""One client's round: its SLM, masked LoRA from the broadcast, local training, the factors sent back.

The client's edge is the one place where an update crosses between coordinate systems: the broadcast arrives
in LLM coordinates and is shrunk to the block's (a structured block is physically smaller); the trained
factors are expanded back to LLM coordinates before they leave. Everything the server and the aggregators
see is in LLM coordinates.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from legokit.config import ExperimentConfig
from legokit.lora import attach_lora, detach_lora, lora_factors
from legokit.messages import ClientResult, Factors, client_seed
from legokit.train import train_client
from legokit.utils import LegokitError


def local_update(cfg: ExperimentConfig, block, tokenizer, examples: list, init: Factors, scaling: float,
                 *, client: int, rnd: int, device: torch.device | None = None, progress: bool = True,
                 train_steps: int | None = None) -> ClientResult:
    """One client's round: masked LoRA on its block from the broadcast ``init``, trained on its data.

    Args:
        init, scaling: the adapter the client starts from, in LLM coordinates (``scaling * B @ A``).
        train_steps: local steps, or None for ``cfg.train.local_steps``.
    Returns:
        The trained factors in LLM coordinates, with the training metrics.
    """
    if not examples:
        raise LegokitError(f"client {client} has no training data: use fewer clients or more train_examples")
    model = block.model
    masks = block.local_masks if cfg.lora.mask_in_training else None
    seed = client_seed(cfg.seed, rnd, client)
    t0 = time.time()
    local_init = {n: block.coords.shrink_factors(n, a, b) for n, (a, b) in init.items()}
    attach_lora(model, cfg.lora, masks=masks, init=local_init, scaling=scaling, seed=seed)
    try:
        train_cfg = cfg.train if train_steps is None else replace(cfg.train, local_steps=train_steps)
        res = train_client(model, tokenizer, examples, train_cfg, seed=seed, client=f"client-{client}",
                           round_idx=rnd, device=device, progress=progress)
        factors = {n: block.coords.expand_factors(n, a, b) for n, (a, b) in lora_factors(model).items()}
    finally:
        detach_lora(model)
        block.release()
    metrics = {"loss_first": res.losses[0], "loss_last": res.losses[-1], "losses": res.losses,
               "steps": res.steps, "tokens": res.tokens, "seconds": round(time.time() - t0, 3),
               "tokens_per_second": res.tokens_per_second}
    return ClientResult(client, factors, scaling, len(examples), metrics)


def examples_per_task(examples: list) -> dict[str, int]:
    """``{task: number of examples}`` of one client's data, tasks in first-seen order.

    The one count of a client's task mix: the federation's client records, the Flower client's replies and
    ``analysis.task_mix`` all use it.
    """
    mix: dict[str, int] = {}
    for ex in examples:
        mix[ex.task] = mix.get(ex.task, 0) + 1
    return mix
