"""What the server sends back after a round: the three kinds of global state a LEGO round can end in.

Each kind is one class with the same five methods (the ``Broadcast`` protocol below documents them), so the
strategy never asks which one it holds:

``AdapterBroadcast`` (``fed.broadcast=adapter``): ΔW_g is re-factored by SVD to a rank-``rank`` adapter that
every client starts from and that is applied through each block's mask (FlexLoRA: each client's own rank).
``MergeBroadcast`` (``fed.broadcast=merge``): ΔW_g is added to the LLM and to every block (M ⊙ ΔW_g), and each
round starts a fresh seeded adapter. ``LocalAdapters`` (the ``local`` reference): nothing is combined; each
client keeps training its own adapter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from legokit.adapters import load_peft_adapter, save_peft_adapter
from legokit.blocks import Block
from legokit.config import ExperimentConfig
from legokit.lora import svd_refactor
from legokit.messages import SERVER, ClientResult, Factors, client_seed, initial_factors

Combine = Callable[[str, dict | None], torch.Tensor]  # (module, {module: previous ΔW_g} | None) -> ΔW_g (out, in)
Adapter = tuple[Factors, float]  # (factors in LLM coordinates, scaling)


class AdapterBroadcast:
    """The global adapter: ΔW_g re-factored to ``rank`` by truncated SVD, one scaling ``alpha / rank``."""

    def __init__(self, cfg: ExperimentConfig, llm: nn.Module, rank: int):
        self.cfg, self.rank = cfg, rank
        self.factors: Factors = initial_factors(llm, cfg.lora, client_seed(cfg.seed, 0, SERVER))
        self.scaling = cfg.lora.scaling

    def starting_adapter(self, client: int) -> Adapter:
        return self.factors, self.scaling

    def adapter_for(self, client: int | None) -> Adapter | None:
        return self.factors, self.scaling

    def absorb(self, rnd: int, results: Sequence[ClientResult], combine: Combine, modules: Iterable[str]) -> dict:
        scaling = self.cfg.lora.alpha / self.rank  # one scaling for every module, also where the rank is capped
        factors, energies = {}, {}
        for name in modules:
            a, b = self.factors[name]
            delta = combine(name, {name: self.scaling * (b @ a)})  # previous ΔW_g (out, in) for uncovered="keep"
            a, b, energy = svd_refactor(delta, self.rank, scaling)
            factors[name], energies[name] = (a, b), float(energy)
        self.factors, self.scaling = factors, scaling
        vals = np.array(list(energies.values()))
        return {"energy_kept_mean": float(vals.mean()), "energy_kept_min": float(vals.min()), "energy_kept": energies}

    def save(self, directory: Path) -> None:
        save_peft_adapter(directory, self.factors, self.cfg.model, alpha=None, scaling=self.scaling,
                          target_modules=self.cfg.lora.target_modules)

    def load(self, directory: Path, rnd: int) -> None:
        self.factors, self.scaling = load_uniform_adapter(directory)


class MergeBroadcast:
    """ΔW_g folded into the LLM and into every block (through its mask); a fresh seeded adapter each round.

    The LLM's weights and the blocks' stored weights are this object's to change: it is built over the
    experiment's ``llm`` and ``blocks`` list, and ``load`` replaces the list's entries with the saved blocks.
    """

    def __init__(self, cfg: ExperimentConfig, llm: nn.Module, blocks: list):
        self.cfg, self.llm, self.blocks = cfg, llm, blocks
        self.factors: Factors = initial_factors(llm, cfg.lora, client_seed(cfg.seed, 0, SERVER))
        self.modules = list(self.factors)

    def starting_adapter(self, client: int) -> Adapter:
        return self.factors, self.cfg.lora.scaling

    def adapter_for(self, client: int | None) -> Adapter | None:
        return None  # the update is in the weights

    def absorb(self, rnd: int, results: Sequence[ClientResult], combine: Combine, modules: Iterable[str]) -> dict:
        for name in modules:
            self._merge(name, combine(name, None))
        self.factors = initial_factors(self.llm, self.cfg.lora, client_seed(self.cfg.seed, rnd, SERVER))
        return {}

    @torch.no_grad()
    def _merge(self, name: str, delta: torch.Tensor) -> None:
        w = self.llm.get_submodule(name).weight
        w += delta.to(w.device, w.dtype)
        for block in self.blocks:
            block.add_to_base(name, delta)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        merged = {n: self.llm.get_submodule(n).weight.detach().cpu().contiguous() for n in self.modules}
        save_file(merged, str(directory / "merged_linear.safetensors"))
        for i, block in enumerate(self.blocks):
            block.save(directory / "blocks" / f"{i}")

    def load(self, directory: Path, rnd: int) -> None:
        merged = load_file(str(directory / "merged_linear.safetensors"))
        with torch.no_grad():
            for n, w in merged.items():
                self.llm.get_submodule(n).weight.copy_(w)
        self.blocks[:] = [Block.load(directory / "blocks" / f"{i}", self.llm) for i in range(len(self.blocks))]
        self.factors = initial_factors(self.llm, self.cfg.lora, client_seed(self.cfg.seed, rnd, SERVER))


class LocalAdapters:
    """The ``local`` reference: every client keeps its own adapter; nothing is combined or sent."""

    def __init__(self, cfg: ExperimentConfig, llm: nn.Module):
        self.cfg = cfg
        self.factors: Factors = initial_factors(llm, cfg.lora, client_seed(cfg.seed, 0, SERVER))
        self.own: dict[int, Adapter] = {}

    def starting_adapter(self, client: int) -> Adapter:
        return self.own.get(client, (self.factors, self.cfg.lora.scaling))

    def adapter_for(self, client: int | None) -> Adapter | None:
        return None if client is None else self.own.get(client)

    def absorb(self, rnd: int, results: Sequence[ClientResult], combine: Combine, modules: Iterable[str]) -> dict:
        for r in results:
            self.own[r.client] = (r.factors, r.scaling)
        return {}

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        for k, (factors, scaling) in sorted(self.own.items()):
            save_peft_adapter(directory / f"client_{k}", factors, self.cfg.model, alpha=None, scaling=scaling,
                              target_modules=self.cfg.lora.target_modules)

    def load(self, directory: Path, rnd: int) -> None:
        for sub in sorted(directory.glob("client_*")):
            self.own[int(sub.name.split("_")[1])] = load_uniform_adapter(sub)


class Broadcast(Protocol):
    """The global state a strategy holds between rounds (``AdapterBroadcast``, ``MergeBroadcast``,
    ``LocalAdapters``), and what it sends to the clients.

    An adapter here is ``(factors, scaling)``: ``{module: (A (r, in), B (out, r))}`` in LLM coordinates, whose
    update is ``scaling · B @ A``.
    """

    def starting_adapter(self, client: int) -> Adapter:
        """The adapter ``client`` trains from in the next round (``LegoStrategy.configure`` puts it in its task)."""

    def adapter_for(self, client: int | None) -> Adapter | None:
        """The adapter that sits on top of the weights when the outcome is evaluated: the global LLM's for
        ``client=None``, else that client's block's; None when there is none (the update is in the weights, or
        the client never trained)."""

    def absorb(self, rnd: int, results: Sequence[ClientResult], combine: Combine, modules: Iterable[str]) -> dict:
        """Take in round ``rnd``'s valid results and become the new global state; returns round metrics to record
        (e.g. the SVD's energy kept), ``{}`` when there are none.

        ``combine(name, previous)`` is the strategy's aggregator applied to one module (``LegoStrategy.combine``
        over ``results``): ``name`` is the module; ``previous`` is ``{name: ΔW_g of the previous round, (out, in)}``
        (what ``fed.uncovered="keep"`` keeps where no client owns a coordinate), or None (nothing to keep: uncovered
        coordinates become 0, as under ``"zero"``). It returns that module's new ΔW_g, a dense float32 ``(out, in)``
        tensor in LLM coordinates that the caller may keep. Call it once per module of ``modules`` (the strategy's
        modules, possibly wrapped in a progress bar), one after another, so memory holds one module's client deltas
        at a time. It raises ``LegokitError`` when the strategy has no aggregator (``local``): ``LocalAdapters``
        never calls it.
        """

    def save(self, directory: Path) -> None:
        """Write the state of the last absorbed round into ``directory``, which does not exist yet
        (``checkpoint.Checkpoint`` makes it atomic: it renames that folder once it is complete)."""

    def load(self, directory: Path, rnd: int) -> None:
        """Restore the state ``save`` wrote after round ``rnd`` (``rnd`` seeds what is drawn fresh per round)."""


def load_uniform_adapter(adapter_dir: Path) -> Adapter:
    """Read an adapter written with one scaling ``s`` for every module: ``(factors, s)``."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scaling = float(config["lora_alpha"]) / int(config["r"])
    factors, _ = load_peft_adapter(adapter_dir, scaling=scaling)
    return factors, scaling
