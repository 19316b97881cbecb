"""Helpers shared by the unit tests: calibration texts, an example factory, the tiny experiment config, random
token ids and LoRA factors. Plain functions and constants (no fixtures): ``from helpers import ...``."""

from __future__ import annotations

import torch
from torch import nn

from legokit.config import ExperimentConfig
from legokit.data import Example
from legokit.models import linear_modules

# Calibration texts short enough for tiny-llama's 32-token sequences (two distinct paragraphs, twice).
CALIB = ["The quick brown fox jumps over the lazy dog. " * 4, "Paris is the capital of France. " * 4] * 2


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
