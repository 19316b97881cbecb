"""The one LEGO round loop: configure -> the clients' local updates -> aggregate -> checkpoint, round by round.

``Federation`` drives a ``strategy.LegoStrategy`` (the server's decisions and global state) with a client
runner (who executes the round's tasks) and a ``checkpoint.Checkpoint`` (the run directory). ``step()`` runs
one round and returns its record; ``run()`` runs the remaining rounds. Three callers drive this loop:

- ``run_federation`` (``legokit run``, the notebooks): the clients run in this process (``InProcessClients``);
- the Flower ServerApp (``legokit.flower.strategy.FlowerStrategy``): the clients are SuperNodes over a Grid;
- notebook ``00_tour``: ``step()`` once per round, to look at each round's updates and broadcast.

Every random draw is a pure function of (seed, round, client), so a run resumed from its last finished round
ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from legokit.checkpoint import Checkpoint
from legokit.client import examples_per_task, local_update
from legokit.config import ExperimentConfig
from legokit.lora import attach_lora, detach_lora
from legokit.messages import ClientResult, Task
from legokit.strategy import LegoStrategy, build_strategy
from legokit.utils import LegokitError, progress_write


@dataclass
class Outcome:
    """How one task ended, as a client runner reports it: a result, or the error that stopped it.

    ``record`` holds what the runner adds to the task's metrics line (e.g. Flower's bytes and node id).
    """

    task: Task
    result: ClientResult | None = None
    error: str | None = None
    record: dict = field(default_factory=dict)


@dataclass
class Exchange:
    """What a client runner reports for a round: each task's outcome, and what it adds to the round's line.

    ``combine``: set by a runner that aggregated securely (``legokit.flower.secagg``): ``combine(module, previous)``
    is the round's ΔW_g (what ``LegoStrategy.combine`` computes from the updates); its outcomes then carry each
    client's metrics but no factors, since the server only learns the sum.
    """

    outcomes: list[Outcome]
    record: dict = field(default_factory=dict)
    combine: Callable[[str, dict | None], torch.Tensor] | None = None


@dataclass
class RoundRecord:
    """A finished round: its tasks' results (the valid ones), every client's metrics line, the round's line."""

    round: int
    results: list[ClientResult]
    lines: list[dict]
    metrics: dict


ClientRunner = Callable[[Sequence[Task]], Exchange]


class Federation:
    """The round loop over a strategy, a client runner and a checkpoint.

    Args:
        strategy: configures and aggregates (holds the global state).
        clients: runs a round's tasks and reports each one's ``Outcome``.
        checkpoint: the run directory; the loop resumes after its last finished round.
        log: where a failing client is reported (None: silent).
        on_round: called with ``(round, round_metrics)`` after each finished round (notebook plots).
    """

    def __init__(self, strategy: LegoStrategy, clients: ClientRunner | None, checkpoint: Checkpoint, *,
                 log: Callable[[str], None] | None = progress_write,
                 on_round: Callable[[int, dict], None] | None = None):
        self.strategy, self.clients, self.checkpoint = strategy, clients, checkpoint
        self.log, self.on_round = log, on_round
        self.round = checkpoint.restore(strategy)

    @property
    def rounds(self) -> list[dict]:
        """Every finished round's metrics line (``rounds.jsonl``)."""
        return self.checkpoint.rounds

    @property
    def done(self) -> bool:
        return self.round >= self.strategy.cfg.fed.rounds

    def run(self) -> Federation:
        """Run the remaining rounds of ``fed.rounds``."""
        while not self.done:
            self.step()
        return self

    def step(self) -> RoundRecord:
        """Run the next round: configure, let the clients work, then ``finish`` it."""
        if self.done:
            raise LegokitError(f"all {self.strategy.cfg.fed.rounds} rounds are done (fed.rounds)")
        if self.clients is None:
            raise LegokitError("this federation has no client runner: its rounds are finished by the caller")
        started = time.time()
        tasks = self.strategy.configure(self.round + 1)
        return self.finish(self.round + 1, self.clients(tasks), started)

    def finish(self, rnd: int, exchange: Exchange, started: float) -> RoundRecord:
        """Validate the outcomes, aggregate the valid results, commit the round to the checkpoint.

        A client whose task failed, or whose result does not fit the LLM, is recorded as failed and the
        round aggregates over the others. A secure exchange (``Exchange.combine``) brings the aggregate itself:
        its results have no factors to validate or measure.
        """
        secure = exchange.combine is not None
        if rnd != self.round + 1:
            raise LegokitError(f"round {rnd} cannot follow round {self.round}")
        results, lines = [], []
        for o in sorted(exchange.outcomes, key=lambda o: o.task.client):  # clients in order: sums add up the same way
            block = self.strategy.blocks[o.task.block]
            line = {"round": rnd, "client": o.task.client, "block": block.id, "sparsity": block.sparsity,
                    **o.record}
            error = o.error
            if o.result is not None and not secure:
                try:
                    self.strategy.validate(o.result)
                except LegokitError as err:
                    error = str(err)
            if error is None:
                results.append(o.result)
                line.update(status="ok", num_examples=o.result.num_examples, **o.result.metrics)
                if not secure:
                    line["update_norm"] = o.result.update_norm()
            else:
                line.update(status="failed", error=error)
                if self.log is not None:
                    self.log(f"round {rnd}: client {o.task.client} failed: {error}")
            lines.append(line)
        if not results and self.log is not None:
            self.log(f"round {rnd}: no client trained; the global state stays as it was")
        metrics = self.strategy.aggregate(rnd, results, exchange.combine)
        metrics.update(exchange.record)
        metrics.update(seconds=round(time.time() - started, 3),
                       failed=[ln["client"] for ln in lines if ln["status"] != "ok"])
        self.checkpoint.commit(rnd, self.strategy, lines, metrics)
        self.round = rnd
        if self.on_round is not None:
            self.on_round(rnd, metrics)
        return RoundRecord(rnd, results, lines, metrics)


class InProcessClients:
    """Runs a round's tasks one after the other in this process, each on its block's SLM.

    Args:
        partitions: one list of training examples per client (the task's client indexes it).
        inject_failures: ``{round: [client, ...]}`` clients that raise in that round (to study failure
            handling: a failing client is recorded and the round aggregates over the others).
    """

    def __init__(self, cfg: ExperimentConfig, blocks: list, tokenizer, partitions: Sequence[list], *,
                 device: torch.device | None = None, progress: bool = True,
                 inject_failures: Mapping[int, list[int]] | None = None):
        self.cfg, self.blocks, self.tokenizer, self.partitions = cfg, blocks, tokenizer, partitions
        self.device, self.progress = device, progress
        self.inject_failures = inject_failures or {}

    def __call__(self, tasks: Sequence[Task]) -> Exchange:
        return Exchange([self._run(t) for t in tasks])

    def _run(self, task: Task) -> Outcome:
        examples = self.partitions[task.client]
        block = self.blocks[task.block]
        out = Outcome(task, record={"num_examples": len(examples), "tasks": examples_per_task(examples)})
        try:
            if task.client in self.inject_failures.get(task.round, []):
                raise LegokitError(f"injected failure of client {task.client} in round {task.round}")
            out.result = local_update(self.cfg, block, self.tokenizer, examples, task.factors, task.scaling,
                                      client=task.client, rnd=task.round, device=self.device,
                                      progress=self.progress, train_steps=task.steps)
        except Exception as err:  # a failing client is recorded; the round goes on without it
            block.release()
            out.error = f"{type(err).__name__}: {err}"
            out.record["traceback"] = traceback.format_exc(limit=5)
        return out


def build_federation(cfg: ExperimentConfig, llm: nn.Module, tokenizer, blocks: list, partitions: Sequence[list],
               run_dir: str | Path, *, resume: bool = False, progress: bool = True,
               inject_failures: Mapping[int, list[int]] | None = None,
               on_round: Callable[[int, dict], None] | None = None,
               checkpoint: Checkpoint | None = None) -> Federation:
    """The in-process federation of ``cfg`` (its condition built by ``strategy.build_strategy``), not yet run.

    Args:
        partitions: one list of training examples per client (``experiment.client_partitions``);
            ``centralized`` pools them into its one client.
        run_dir: the run directory; with ``resume`` the loop continues after its last finished round.
        checkpoint: ``run_dir`` already opened (``experiment.run_experiment`` opens it before the model
            loads); None opens it here.
    """
    if len(partitions) != cfg.fed.num_clients:
        raise LegokitError(f"{len(partitions)} partitions for fed.num_clients={cfg.fed.num_clients}")
    for k, part in enumerate(partitions):
        if not part:
            raise LegokitError(f"client {k} has no training data: use fewer clients or more data.train_examples")
    if checkpoint is None:
        checkpoint = Checkpoint(run_dir, cfg, resume)
    strategy = build_strategy(cfg, llm, blocks, progress=progress)
    if strategy.pools_clients:  # one LoRA on the pooled data
        partitions = [[ex for part in partitions for ex in part]]
    clients = InProcessClients(cfg, blocks, tokenizer, partitions, device=next(llm.parameters()).device,
                               progress=progress, inject_failures=inject_failures)
    return Federation(strategy, clients, checkpoint, log=progress_write if progress else None, on_round=on_round)


def run_federation(cfg: ExperimentConfig, llm: nn.Module, tokenizer, blocks: list, partitions: Sequence[list],
                   run_dir: str | Path, **kwargs) -> Federation:
    """Run ``cfg.fed.rounds`` rounds in one process; checkpoint each; resume from the last finished.

    Takes ``federation``'s arguments. Returns:
        The finished ``Federation`` (``.strategy`` holds the final global state, ``.rounds`` the round lines).
    """
    return build_federation(cfg, llm, tokenizer, blocks, partitions, run_dir, **kwargs).run()


# ----- the outcome as models -------------------------------------------------------------------------
def global_model(strategy: LegoStrategy, llm: nn.Module):
    """A context manager yielding the global LLM: the LLM with the global adapter when there is one (unmasked)."""
    return _Attached(llm, strategy.cfg, strategy.broadcast.adapter_for(None), masks=None)


def block_model(strategy: LegoStrategy, block_index: int, client: int | None = None):
    """A context manager yielding a block's SLM with the global update applied through its mask.

    ``client``: in the ``local`` reference, that client's own adapter on its block.
    """
    block = strategy.blocks[block_index]
    adapter = strategy.broadcast.adapter_for(client)
    if adapter is not None:
        factors, scaling = adapter
        adapter = {n: block.coords.shrink_factors(n, a, b) for n, (a, b) in factors.items()}, scaling
    return _Attached(block.model, strategy.cfg, adapter, masks=block.local_masks, release=block)


class _Attached:
    """A context manager that puts an adapter on a model for the ``with`` block and takes it off afterwards.

    ``adapter`` is ``(factors, scaling)`` in ``model``'s own coordinates, or None (the model as it is);
    ``masks`` confine the update to a block's kept weights (None: unmasked, the global LLM). On exit the
    adapter is detached and ``release`` (a ``blocks.Block``), when given, drops its built SLM (``Block.release``).
    """

    def __init__(self, model, cfg, adapter, masks, release=None):
        self.model, self.cfg, self.adapter, self.masks, self.release = model, cfg, adapter, masks, release

    def __enter__(self):
        if self.adapter is not None:
            attach_lora(self.model, self.cfg.lora, masks=self.masks, init=self.adapter[0], scaling=self.adapter[1])
        return self.model

    def __exit__(self, *exc):
        if self.adapter is not None:
            detach_lora(self.model)
        if self.release is not None:
            self.release.release()
        return False
