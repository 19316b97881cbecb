"""The messages of one LEGO round (``Task`` out to a client, ``ClientResult`` back) and the round's seeds
(``client_seed``, ``initial_factors``).

- ``Task``: what the server asks of one client in round ``r`` (its block, the factors it starts from, in LLM
  coordinates, and optionally a number of local steps). A Flower ``train`` message carries the same fields.
- ``ClientResult``: what the client sends back (its factors in LLM coordinates, scaling, sample count) plus what
  the experiment records about its training.
- ``client_seed``: the seed of one client's round, a pure function of (run seed, round, client), so a resumed run
  needs no saved RNG state and ends with the same numbers as an uninterrupted one.
- ``initial_factors``: the adapter every client starts from in the first round (A seeded, B = 0, as peft).

Nothing here touches a model beyond reading its linear modules' shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from legokit.config import LoraConfig
from legokit.models import linear_modules

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B (out, r)), LLM coordinates

SERVER = -1  # the "client" index whose seed draws the server's adapters (initial and merge-mode fresh ones)


def client_seed(seed: int, rnd: int, client: int) -> int:
    """The seed of one client's local training in round ``rnd`` (round 0 = the initial adapter)."""
    # client -1 is the server; SeedSequence takes only non-negative entries
    return int(np.random.SeedSequence([seed, rnd, client % 2**32]).generate_state(1)[0])


def initial_factors(llm: nn.Module, lora: LoraConfig, seed: int) -> Factors:
    """The adapter every client starts from: A shared and seeded (kaiming-uniform, as peft), B = 0."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in linear_modules(llm, lora.target_modules).items():
        a = torch.empty(lora.rank, mod.in_features)
        bound = 1 / math.sqrt(mod.in_features)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / peft
        a.uniform_(-bound, bound, generator=gen)
        out[name] = (a, torch.zeros(mod.out_features, lora.rank))
    return out


@dataclass(frozen=True)
class Task:
    """One client's work in one round, as the server configures it.

    Attributes:
        round, client: which round, which client.
        block: index of the block the client holds (into the strategy's ``blocks``).
        factors, scaling: the adapter it starts from, in LLM coordinates (``scaling * B @ A``).
        steps: local steps for this task, or None for ``train.local_steps``.
    """

    round: int
    client: int
    block: int
    factors: Factors
    scaling: float
    steps: int | None = None


@dataclass
class ClientResult:
    """What one client sends back after a round (plus what the experiment records about it)."""

    client: int
    factors: Factors  # LLM coordinates
    scaling: float
    num_examples: int
    metrics: dict = field(default_factory=dict)

    def update_norm(self) -> float:
        """Frobenius norm of the whole update ``s · B A`` over all modules (recorded per client and round)."""
        return float(sum(float((self.scaling * b @ a).square().sum()) for a, b in self.factors.values()) ** 0.5)
