"""The server's side of a LEGO round, pure over tensors and client results, shaped like a Flower strategy.

``LegoStrategy.configure(rnd)`` says which clients train and what each starts from (a list of ``Task``);
``LegoStrategy.aggregate(rnd, results)`` recombines their factors module by module and hands ΔW_g to the
broadcast (``legokit.broadcast``), which becomes the new global state. It knows nothing of processes, files or
Flower: ``federation.Federation`` drives it in one process, ``flower.strategy.FlowerStrategy`` over a Grid.

The experiment's conditions are built from these parts by ``build_strategy``, not by flags inside them:

==============  ================================================================================
condition       parts
==============  ================================================================================
an aggregator   every client on its block; ``AGGREGATORS[name]``; ``AdapterBroadcast`` at the global
                rank (FlexLoRA: at each client's rank) or ``MergeBroadcast``
``local``       every client on its block; no aggregator; ``LocalAdapters``
``centralized`` one client (index 0) on the dense block, trained on the pooled data for as many steps
                as all clients together; HeteAgg of that one update; ``AdapterBroadcast``
==============  ================================================================================

What sets the references apart is read off the strategy, never off the aggregator's name: ``has_global``
(False for ``local``: there is no global model) and ``pools_clients`` (True for ``centralized``). Before a
strategy exists, ``aggregator_has_global`` and ``aggregator_pools_clients`` answer the same from the name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from legokit.aggregate import AGGREGATORS, ClientUpdate
from legokit.broadcast import AdapterBroadcast, Broadcast, LocalAdapters, MergeBroadcast
from legokit.config import ExperimentConfig, sampled_count
from legokit.messages import ClientResult, Task
from legokit.models import linear_modules
from legokit.names import DEVICE_PROFILES, aggregator_has_global, aggregator_pools_clients
from legokit.privacy.accountant import privacy_plan
from legokit.privacy.mechanism import PrivateOwnerMean
from legokit.utils import LegokitError, progress_bar


def sample_clients(seed: int, rnd: int, clients: Sequence[int], fraction: float) -> list[int]:
    """The clients taking part in round ``rnd``: ``fraction`` of ``clients`` (rounded half up), seeded by
    (seed, round); all of them when the fraction covers everybody."""
    n = len(clients)
    m = sampled_count(fraction, n)
    if m < 1:
        raise LegokitError(f"fed.sample_fraction={fraction} of {n} clients selects no client: use a fraction of "
                           f"at least {0.5 / n:.3g} (one client)")
    if m >= n:
        return list(clients)
    rng = np.random.default_rng([seed, rnd, 7])
    return sorted(int(clients[i]) for i in rng.choice(n, size=m, replace=False))


def check_result(result: ClientResult, shapes: dict[str, tuple[int, int]]) -> None:
    """Reject an update whose modules, shapes or values do not fit the LLM (the caller records a failure)."""
    k = result.client
    missing = set(shapes) - set(result.factors)
    if missing:
        raise LegokitError(f"client {k} sent no factors for {sorted(missing)[:3]}...")
    for name, (a, b) in result.factors.items():
        if name not in shapes:
            raise LegokitError(f"client {k} sent factors for unknown module {name!r}")
        out, inp = shapes[name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != inp or b.shape[0] != out or a.shape[0] != b.shape[1]:
            raise LegokitError(f"client {k}: factors for {name} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                               f"expected A (r, {inp}) and B ({out}, r)")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LegokitError(f"client {k}: factors for {name} are not finite")


def assign_blocks(cfg: ExperimentConfig, blocks: list) -> list[int]:
    """Index into ``blocks`` of the block each client holds.

    Explicit ``fed.client_sparsities`` win; else each device profile gets the densest block whose kept
    fraction fits its budget; else clients cycle through the extracted levels in order.
    """
    fed, levels = cfg.fed, [b.sparsity for b in blocks]

    def index_of(s: float) -> int:
        for i, lv in enumerate(levels):
            if abs(lv - s) < 1e-9:
                return i
        raise LegokitError(f"no block of sparsity {s}; extracted levels: {levels}")

    if fed.client_sparsities is not None:
        return [index_of(s) for s in fed.client_sparsities]
    if fed.devices is not None:
        out = []
        for dev in fed.devices:
            budget = DEVICE_PROFILES[dev]
            fitting = [i for i, lv in enumerate(levels) if 1 - lv <= budget + 1e-9]
            if not fitting:
                raise LegokitError(f"device {dev!r} (budget {budget:.0%} of the LLM) fits no block; "
                                   f"extract a sparser level (e.g. add {1 - budget:.2f} to prune.sparsities)")
            out.append(min(fitting, key=lambda i: levels[i]))
        return out
    return [k % len(blocks) for k in range(fed.num_clients)]


class LegoStrategy:
    """Configure and aggregate LEGO rounds over the blocks' masks; the global state lives in ``broadcast``.

    Args:
        cfg: the experiment.
        blocks: the blocks the clients hold (their masks are all the server knows of a client's model).
        assignment: index into ``blocks`` per client (``fed.num_clients`` entries).
        shapes: ``{module: (out, in)}`` of the LLM modules LoRA targets.
        broadcast: the global state (``AdapterBroadcast``, ``MergeBroadcast`` or ``LocalAdapters``).
        aggregator: an ``AGGREGATORS`` name, or None when nothing is combined (``local``).
        clients: the clients a round samples from (default: all).
        local_steps: local steps per task, or None for ``train.local_steps``.
        has_global: False when there is no global model (``local``: each client keeps its own adapter).
        pools_clients: True when one client trains on every client's data pooled (``centralized``).
        progress: show a progress bar over the modules while aggregating.
        privacy: the DP owner mean that replaces the aggregator (``privacy.mode`` central or local), or None.
    """

    def __init__(self, cfg: ExperimentConfig, blocks: list, assignment: list[int], shapes: dict[str, tuple[int, int]],
                 broadcast: Broadcast, aggregator: str | None, *, clients: Sequence[int] | None = None,
                 local_steps: int | None = None, has_global: bool = True, pools_clients: bool = False,
                 progress: bool = True, privacy: PrivateOwnerMean | None = None):
        if len(assignment) != cfg.fed.num_clients:
            raise LegokitError(f"{len(assignment)} block assignments for fed.num_clients={cfg.fed.num_clients}")
        self.cfg, self.blocks, self.broadcast = cfg, blocks, broadcast
        self._assignment = list(assignment)
        self.shapes = dict(shapes)
        self.modules = list(shapes)
        self.aggregator = aggregator
        self.clients = list(range(cfg.fed.num_clients) if clients is None else clients)
        self.local_steps = local_steps
        self._has_global, self._pools_clients = has_global, pools_clients
        self.progress, self.privacy = progress, privacy
        self.round = 0
        # the last aggregated round's updates, kept for analysis (the notebooks re-aggregate them) until the next
        # round is configured: holding them while that round trains would add every client's factors to its peak
        self.last_results: list[ClientResult] = []

    @property
    def assignment(self) -> tuple[int, ...]:
        """Index into ``blocks`` of the block each client holds (change it with ``assign``)."""
        return tuple(self._assignment)

    @property
    def has_global(self) -> bool:
        """Whether the condition has a global model (False for ``local``: each client keeps its own adapter)."""
        return self._has_global

    @property
    def pools_clients(self) -> bool:
        """Whether one client trains on every client's data pooled (``centralized``)."""
        return self._pools_clients

    @property
    def global_rank(self) -> int:
        """The rank of the broadcast adapter by default (``global_rank(cfg)``)."""
        return global_rank(self.cfg)

    def assign(self, client: int, block: int) -> None:
        """Let ``client`` hold ``blocks[block]`` (a device that declares its own block)."""
        if not 0 <= block < len(self.blocks):
            raise LegokitError(f"block index {block} is out of range 0..{len(self.blocks) - 1}")
        self._assignment[client] = block

    def block_of(self, client: int):
        """The block ``client`` holds."""
        return self.blocks[self._assignment[client]]

    # ----- configure ----------------------------------------------------------------------------------
    def configure(self, rnd: int) -> list[Task]:
        """The round's tasks: the sampled clients, each with its block and the adapter it starts from.

        Drops ``last_results`` (the previous round's updates, already absorbed into the global state).
        """
        self.last_results = []
        tasks = []
        for k in sample_clients(self.cfg.seed, rnd, self.clients, self.cfg.fed.sample_fraction):
            factors, scaling = self.broadcast.starting_adapter(k)
            tasks.append(Task(rnd, k, self._assignment[k], factors, scaling, self.local_steps))
        return tasks

    def start_state(self, client: int) -> tuple[dict, float]:
        """The (factors, scaling) ``client`` would start its next round from, in LLM coordinates."""
        return self.broadcast.starting_adapter(client)

    # ----- aggregate ----------------------------------------------------------------------------------
    def validate(self, result: ClientResult) -> None:
        """Reject an update whose modules, shapes or values do not fit the LLM (``check_result``)."""
        check_result(result, self.shapes)

    def aggregate(self, rnd: int, results: list[ClientResult], combine=None) -> dict:
        """Recombine the clients' updates module by module into the new global state.

        ``combine(name, previous)``: the round's ΔW_g when it was aggregated elsewhere (secure aggregation:
        ``results`` then carry no factors); default ``self.combine`` over ``results``.

        Returns:
            Round metrics: ``round``, ``clients`` and what the broadcast reports (energy kept by the SVD).
        """
        self.round = rnd
        self.last_results = results
        if not results:  # no survivors: the previous global state stands
            return {"round": rnd, "clients": 0, "note": "no surviving client; global state kept"}
        modules = progress_bar(self.modules, desc=f"round {rnd} aggregate", leave=False, disable=not self.progress)
        out = {"round": rnd, "clients": len(results)}
        if self.privacy is not None:  # the clip factors need every module's update before any module is combined
            if combine is not None:
                raise LegokitError("privacy.mode central/local needs each client's update to clip it, but this round "
                                   "was aggregated securely (the server has only the sum): run DP without SecAgg+")
            out.update(self.privacy.start_round(rnd, self.updates(results), self._bases(results[0].client),
                                                [self.block_of(k).masks for k in self.clients]))
        combine = combine or (lambda name, prev: self.combine(results, name, prev))
        out.update(self.broadcast.absorb(rnd, results, combine, modules))
        return out

    def combine(self, results: Sequence[ClientResult], name: str, previous: dict | None = None) -> torch.Tensor:
        """ΔW_g of one module, (out, in): the aggregator over the clients' updates through their masks."""
        if self.aggregator is None:
            raise LegokitError("this condition combines no updates (local): there is no ΔW_g")
        if self.privacy is not None:
            prev = None if previous is None else previous.get(name)
            base = self._bases(results[0].client, [name])[name]
            return self.privacy.combine(self.updates(results, [name]), name, base, prev, self.cfg.fed.uncovered)
        return AGGREGATORS[self.aggregator](self.updates(results, [name]), previous, self.cfg.fed.uncovered)[name]

    def updates(self, results: Sequence[ClientResult], names: Sequence[str] | None = None) -> list[ClientUpdate]:
        """The aggregators' view of ``results`` over ``names`` (default: all modules): factors, scaling, the
        client's block masks and its weight (``fed.weighting``: sample count or 1)."""
        names = self.modules if names is None else list(names)
        uniform = self.cfg.fed.weighting == "uniform"
        return [ClientUpdate(client=f"client-{r.client}", factors={n: r.factors[n] for n in names}, scaling=r.scaling,
                             masks={n: self.block_of(r.client).masks[n] for n in names},
                             weight=1.0 if uniform else float(r.num_examples)) for r in results]

    def _bases(self, client: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``{module: s_0 B_0 A_0 (out, in)}`` of the adapter ``client`` started this round from (the same for every
        client under the broadcasts DP supports)."""
        factors, scaling = self.broadcast.starting_adapter(client)
        return {n: scaling * (factors[n][1].float() @ factors[n][0].float()) for n in (names or self.modules)}

    # ----- the global state ----------------------------------------------------------------------------
    def save(self, directory) -> None:
        """Write the global state of the last aggregated round to ``directory`` (see ``checkpoint``)."""
        self.broadcast.save(directory)

    def load(self, directory, rnd: int) -> None:
        """Restore the global state ``save`` wrote after round ``rnd``."""
        self.broadcast.load(directory, rnd)
        self.round = rnd


def global_rank(cfg: ExperimentConfig) -> int:
    """The global adapter's rank: ``fed.global_rank``, else the sum of the client ranks."""
    return cfg.fed.global_rank or cfg.lora.rank * cfg.fed.num_clients


def build_strategy(cfg: ExperimentConfig, llm: nn.Module, blocks: list, *, progress: bool = True) -> LegoStrategy:
    """The strategy of the condition ``cfg.fed`` describes (see the module docstring's table)."""
    fed = cfg.fed
    shapes = {n: tuple(m.weight.shape) for n, m in linear_modules(llm, cfg.lora.target_modules).items()}
    if not aggregator_has_global(fed.aggregator):
        return LegoStrategy(cfg, blocks, assign_blocks(cfg, blocks), shapes, LocalAdapters(cfg, llm), None,
                            has_global=False, progress=progress)
    if fed.broadcast == "merge":
        broadcast = MergeBroadcast(cfg, llm, blocks)
    else:  # FlexLoRA sends each client back its own rank (every client trains at lora.rank)
        broadcast = AdapterBroadcast(cfg, llm, cfg.lora.rank if fed.aggregator == "flexlora" else global_rank(cfg))
    if not aggregator_pools_clients(fed.aggregator):
        plan = privacy_plan(cfg)
        return LegoStrategy(cfg, blocks, assign_blocks(cfg, blocks), shapes, broadcast, fed.aggregator,
                            progress=progress, privacy=None if plan is None else PrivateOwnerMean(plan, cfg.seed))
    dense = [i for i, b in enumerate(blocks) if b.sparsity == 0]
    if not dense:
        raise LegokitError("fed.aggregator='centralized' needs a dense block: add 0.0 to prune.sparsities")
    return LegoStrategy(cfg, blocks, [dense[0]] * fed.num_clients, shapes, broadcast, "heteagg", clients=[0],
                        local_steps=cfg.train.local_steps * fed.num_clients, pools_clients=True, progress=progress)
