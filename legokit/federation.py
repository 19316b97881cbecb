"""The LEGO round loop: configure -> local training on each block -> HeteAgg -> broadcast.

Shaped like a federated strategy so the Flower app (``legokit.flower``) reuses it unchanged:

- ``Server`` holds what a server knows: every block's masks (never a client model), the global
  adapter (adapter mode) or the merged LLM (merge mode), and the round counter. ``configure`` says
  which clients train this round and what they start from; ``aggregate`` recombines their factors,
  module by module, and prepares the broadcast.
- ``local_update`` is one client's round: build its SLM, attach masked LoRA initialised from the
  broadcast, train, and return the factors in LLM coordinates.
- ``run_federation`` drives both in one process, checkpoints every finished round atomically and
  resumes from the last one. Every random draw is a pure function of (seed, round, client), so a
  resumed run needs no saved RNG state and ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from legokit.aggregate import AGGREGATORS, ClientUpdate
from legokit.config import ExperimentConfig
from legokit.lora import attach_lora, detach_lora, load_peft_adapter, lora_factors, save_peft_adapter, svd_refactor
from legokit.models import linear_modules
from legokit.names import DEVICE_PROFILES
from legokit.train import train_client
from legokit.utils import LegokitError, atomic_write_json, atomic_write_text, progress_bar, progress_write

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B (out, r))


def client_seed(seed: int, rnd: int, client: int) -> int:
    """The seed of one client's local training in one round (round 0 = the initial adapter)."""
    # client -1 is the server (the initial / merge-mode adapter); SeedSequence takes only non-negative entries
    return int(np.random.SeedSequence([seed, rnd, client % 2**32]).generate_state(1)[0])


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


def initial_factors(llm: nn.Module, cfg: ExperimentConfig, seed: int) -> Factors:
    """The adapter every client starts from: A shared and seeded (kaiming-uniform, as peft), B = 0."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in linear_modules(llm, cfg.lora.target_modules).items():
        a = torch.empty(cfg.lora.rank, mod.in_features)
        bound = 1 / math.sqrt(mod.in_features)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / peft
        a.uniform_(-bound, bound, generator=gen)
        out[name] = (a, torch.zeros(mod.out_features, cfg.lora.rank))
    return out


def _to_block(block, factors: Factors) -> Factors:
    return {n: block.shrink_factors(n, a, b) for n, (a, b) in factors.items()}


def _to_llm(block, factors: Factors) -> Factors:
    return {n: block.expand_factors(n, a, b) for n, (a, b) in factors.items()}


@dataclass
class ClientResult:
    """What one client sends back after a round (plus what the experiment records about it)."""

    client: int
    factors: Factors  # LLM coordinates
    scaling: float
    num_examples: int
    metrics: dict = field(default_factory=dict)


def local_update(cfg: ExperimentConfig, block, tokenizer, examples: list, init: Factors, scaling: float,
                 *, client: int, rnd: int, device: torch.device | None = None, progress: bool = True,
                 train_steps: int | None = None) -> ClientResult:
    """One client's round: masked LoRA on its block from the broadcast ``init``, trained on its data.

    ``init`` and the returned factors are in LLM coordinates (``scaling * B @ A`` is the update).
    """
    if not examples:
        raise LegokitError(f"client {client} has no training data: use fewer clients or more train_examples")
    model = block.model
    masks = block.local_masks() if cfg.lora.mask_in_training else None
    t0 = time.time()
    attach_lora(model, cfg.lora, masks=masks, init=_to_block(block, init), scaling=scaling,
                seed=client_seed(cfg.seed, rnd, client))
    try:
        train_cfg = cfg.train if train_steps is None else _with_steps(cfg.train, train_steps)
        res = train_client(model, tokenizer, examples, train_cfg, seed=client_seed(cfg.seed, rnd, client),
                           client=f"client-{client}", round_idx=rnd, device=device, progress=progress)
        factors = _to_llm(block, lora_factors(model))
    finally:
        detach_lora(model)
        block.release()
    metrics = {"loss_first": res.losses[0], "loss_last": res.losses[-1], "losses": res.losses,
               "steps": res.steps, "tokens": res.tokens, "seconds": round(time.time() - t0, 3),
               "tokens_per_second": res.tokens_per_second}
    return ClientResult(client, factors, scaling, len(examples), metrics)


def _with_steps(train_cfg, steps: int):
    from dataclasses import replace

    return replace(train_cfg, local_steps=steps)


class Server:
    """The server side of LEGO: block masks, the global state, configure and aggregate."""

    def __init__(self, cfg: ExperimentConfig, llm: nn.Module, blocks: list, assignment: list[int],
                 num_examples: list[int]):
        self.cfg, self.llm, self.blocks, self.assignment = cfg, llm, blocks, assignment
        self.num_examples = num_examples
        self.modules = list(linear_modules(llm, cfg.lora.target_modules))
        shapes = {n: tuple(m.weight.shape) for n, m in linear_modules(llm, cfg.lora.target_modules).items()}
        self.shapes = shapes
        n_clients = cfg.fed.num_clients
        self.global_rank = cfg.fed.global_rank or cfg.lora.rank * n_clients
        self.round = 0
        self.merged = cfg.fed.broadcast == "merge"
        # Adapter mode: the global adapter every client starts from. Merge mode: a fresh shared init.
        self.global_factors: Factors = initial_factors(llm, cfg, client_seed(cfg.seed, 0, -1))
        self.global_scaling = cfg.lora.scaling
        # `local`: every client keeps its own adapter; no aggregation.
        self.client_factors: dict[int, tuple[Factors, float]] = {}
        self.last_results: list[ClientResult] = []

    # ----- configure ---------------------------------------------------------------------------
    def sample(self, rnd: int) -> list[int]:
        """Clients taking part in round ``rnd`` (seeded by (seed, round))."""
        n = self.cfg.fed.num_clients
        m = max(1, round(self.cfg.fed.sample_fraction * n))
        if m >= n:
            return list(range(n))
        rng = np.random.default_rng([self.cfg.seed, rnd, 7])
        return sorted(rng.choice(n, size=m, replace=False).tolist())

    def start_state(self, client: int) -> tuple[Factors, float]:
        """The (factors, scaling) a client starts its round from, in LLM coordinates."""
        if self.cfg.fed.aggregator == "local" and client in self.client_factors:
            return self.client_factors[client]
        return self.global_factors, self.global_scaling

    # ----- aggregate + broadcast -----------------------------------------------------------------
    def validate(self, result: ClientResult) -> None:
        """Reject an update whose modules or shapes do not match the LLM (recorded as a failure)."""
        missing = set(self.modules) - set(result.factors)
        if missing:
            raise LegokitError(f"client {result.client} sent no factors for {sorted(missing)[:3]}...")
        for name, (a, b) in result.factors.items():
            if name not in self.shapes:
                raise LegokitError(f"client {result.client} sent factors for unknown module {name!r}")
            out, inp = self.shapes[name]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != inp or b.shape[0] != out or a.shape[0] != b.shape[1]:
                raise LegokitError(f"client {result.client}: factors for {name} have shapes A {tuple(a.shape)}, "
                                   f"B {tuple(b.shape)}; expected A (r, {inp}) and B ({out}, r)")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise LegokitError(f"client {result.client}: factors for {name} are not finite")

    def aggregate(self, rnd: int, results: list[ClientResult]) -> dict:
        """Recombine the clients' updates module by module and prepare the broadcast.

        Returns round metrics (energy kept by the SVD re-factoring, per module summary).
        """
        cfg = self.cfg
        self.round = rnd
        self.last_results = results  # kept for analysis (the aggregation notebook re-aggregates them)
        if not results:  # no survivors: the previous global state stands
            return {"round": rnd, "clients": 0, "note": "no surviving client; global state kept"}
        if cfg.fed.aggregator == "local":
            for r in results:
                self.client_factors[r.client] = (r.factors, r.scaling)
            return {"round": rnd, "clients": len(results)}
        agg = AGGREGATORS["heteagg" if cfg.fed.aggregator == "centralized" else cfg.fed.aggregator]
        weights = [float(r.num_examples) if cfg.fed.weighting == "samples" else 1.0 for r in results]
        energies, new_factors = {}, {}
        # FlexLoRA sends each client back its own rank (all clients share lora.rank here).
        bcast_rank = cfg.lora.rank if cfg.fed.aggregator == "flexlora" else self.global_rank
        for name in progress_bar(self.modules, desc=f"round {rnd} aggregate", leave=False,
                         disable=not getattr(self, "progress", True)):
            updates = [ClientUpdate(client=f"client-{r.client}", factors={name: r.factors[name]},
                                    scaling=r.scaling, masks={name: self._mask(r.client, name)}, weight=w)
                       for r, w in zip(results, weights, strict=True)]
            previous = None
            if not self.merged:
                a, b = self.global_factors[name]
                previous = {name: self.global_scaling * (b @ a)}  # (out, in)
            delta = agg(updates, previous, cfg.fed.uncovered)[name]
            if self.merged:
                self._merge(name, delta)
            else:
                # one scaling for every module, also where svd_refactor caps the rank at min(out, in)
                a, b, energy = svd_refactor(delta, bcast_rank, cfg.lora.alpha / bcast_rank)
                new_factors[name], energies[name] = (a, b), float(energy)
        if self.merged:  # every round starts a fresh adapter from a shared seeded init
            self.global_factors = initial_factors(self.llm, cfg, client_seed(cfg.seed, rnd, -1))
            self.global_scaling = cfg.lora.scaling
        else:
            self.global_factors = new_factors
            self.global_scaling = cfg.lora.alpha / bcast_rank
        out = {"round": rnd, "clients": len(results)}
        if energies:
            vals = np.array(list(energies.values()))
            out.update(energy_kept_mean=float(vals.mean()), energy_kept_min=float(vals.min()),
                       energy_kept=energies)
        return out

    def _mask(self, client: int, name: str) -> torch.Tensor:
        return self.blocks[self.assignment[client]].masks[name]

    @torch.no_grad()
    def _merge(self, name: str, delta: torch.Tensor) -> None:
        w = self.llm.get_submodule(name).weight
        w += delta.to(w.dtype)
        for block in self.blocks:
            block.add_to_base(name, delta)

    # ----- checkpoint ----------------------------------------------------------------------------
    def save(self, run_dir: Path, rnd: int) -> None:
        """Write round ``rnd``'s global state; the caller then marks the round finished."""
        cfg = self.cfg
        adir = run_dir / "adapters" / f"round_{rnd:03d}"
        tmp = adir.with_name(adir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.fed.aggregator == "local":
            for k, (factors, scaling) in sorted(self.client_factors.items()):
                save_peft_adapter(tmp / f"client_{k}", factors, cfg.model, alpha=None, scaling=scaling,
                                  target_modules=cfg.lora.target_modules)
        elif not self.merged:
            save_peft_adapter(tmp, self.global_factors, cfg.model, alpha=None, scaling=self.global_scaling,
                              target_modules=cfg.lora.target_modules)
        else:
            tmp.mkdir(parents=True)
            merged = {n: self.llm.get_submodule(n).weight.detach().cpu().contiguous() for n in self.modules}
            save_file(merged, str(tmp / "merged_linear.safetensors"))
            for i, block in enumerate(self.blocks):
                block.save(tmp / "blocks" / f"{i}")
        shutil.rmtree(adir, ignore_errors=True)
        tmp.rename(adir)

    def load(self, run_dir: Path, rnd: int) -> None:
        """Restore the global state written by ``save`` for round ``rnd``."""
        adir = run_dir / "adapters" / f"round_{rnd:03d}"
        cfg = self.cfg
        if cfg.fed.aggregator == "local":
            for sub in sorted(adir.glob("client_*")):
                self.client_factors[int(sub.name.split("_")[1])] = load_uniform_adapter(sub)
        elif not self.merged:
            self.global_factors, self.global_scaling = load_uniform_adapter(adir)
        else:
            merged = load_file(str(adir / "merged_linear.safetensors"))
            with torch.no_grad():
                for n, w in merged.items():
                    self.llm.get_submodule(n).weight.copy_(w)
            from legokit.blocks import Block

            self.blocks[:] = [Block.load(adir / "blocks" / f"{i}", self.llm) for i in range(len(self.blocks))]
            self.global_factors = initial_factors(self.llm, cfg, client_seed(cfg.seed, rnd, -1))
        self.round = rnd


def load_uniform_adapter(adapter_dir: Path) -> tuple[Factors, float]:
    """Read an adapter written with one scaling ``s`` for every module: ``(factors, s)``."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scaling = float(config["lora_alpha"]) / int(config["r"])
    factors, _ = load_peft_adapter(adapter_dir, scaling=scaling)
    return factors, scaling


# ----- run directory ---------------------------------------------------------------------------------
class RunDir:
    """A run directory: config.yaml, metrics.jsonl, rounds.jsonl, state.json, results.json, ..."""

    def __init__(self, path: str | Path, cfg: ExperimentConfig, resume: bool):
        self.path = Path(path)
        self.cfg = cfg
        cfg_file = self.path / "config.yaml"
        self.last_round = 0
        self.metrics: list[dict] = []
        self.rounds: list[dict] = []
        if cfg_file.is_file():
            old = ExperimentConfig.from_yaml(cfg_file)
            if not resume:
                if (self.path / "state.json").is_file() or (self.path / "results.json").is_file():
                    raise LegokitError(f"run directory {self.path} already holds a run: pass resume=True "
                                       "(--resume) to continue it, or choose another output directory")
            elif old.to_dict() != cfg.to_dict():
                diff = _config_diff(old.to_dict(), cfg.to_dict())
                raise LegokitError(f"run directory {self.path} belongs to a different config ({diff}); "
                                   "resume with the same config or choose another output directory")
            if resume and (self.path / "state.json").is_file():
                state = json.loads((self.path / "state.json").read_text())
                self.last_round = int(state["round"])
                self.metrics = [m for m in _read_jsonl(self.path / "metrics.jsonl") if m["round"] <= self.last_round]
                self.rounds = [m for m in _read_jsonl(self.path / "rounds.jsonl") if m["round"] <= self.last_round]
        self.path.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(cfg_file)

    def finish_round(self, rnd: int, client_lines: list[dict], round_line: dict) -> None:
        """Record a finished round: metrics first, then state.json (the commit point)."""
        self.metrics.extend(client_lines)
        self.rounds.append(round_line)
        _write_jsonl(self.path / "metrics.jsonl", self.metrics)
        _write_jsonl(self.path / "rounds.jsonl", self.rounds)
        atomic_write_json(self.path / "state.json", {"round": rnd, "time": time.time()})


def _config_diff(a: dict, b: dict, prefix: str = "") -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                return _config_diff(a[k], b[k], f"{prefix}{k}.")
            return f"{prefix}{k}: {a.get(k)!r} there, {b.get(k)!r} here"
    return "identical"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


# ----- the in-process loop -----------------------------------------------------------------------
def run_federation(cfg: ExperimentConfig, llm: nn.Module, tokenizer, blocks: list, partitions: list[list],
                   run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                   inject_failures: Mapping[int, list[int]] | None = None,
                   on_round: Callable[[int, dict], None] | None = None) -> Server:
    """Run ``cfg.fed.rounds`` rounds in one process; checkpoint each; resume from the last finished.

    Args:
        partitions: one list of training examples per client (``legokit.data.partition``).
        inject_failures: ``{round: [client, ...]}`` clients that raise in that round (to study
            failure handling; a failing client is recorded and the round aggregates over the others).
        on_round: called with ``(round, round_metrics)`` after each finished round (notebook plots).
    Returns:
        The ``Server`` holding the final global state.
    """
    if len(partitions) != cfg.fed.num_clients:
        raise LegokitError(f"{len(partitions)} partitions for fed.num_clients={cfg.fed.num_clients}")
    for k, part in enumerate(partitions):
        if not part:
            raise LegokitError(f"client {k} has no training data: use fewer clients or more data.train_examples")
    run = RunDir(run_dir, cfg, resume)
    centralized = cfg.fed.aggregator == "centralized"
    assignment = [0] * cfg.fed.num_clients if centralized else assign_blocks(cfg, blocks)
    if centralized:
        dense = [i for i, b in enumerate(blocks) if b.sparsity == 0]
        if not dense:
            raise LegokitError("fed.aggregator='centralized' needs a dense block: add 0.0 to prune.sparsities")
        assignment = [dense[0]] * cfg.fed.num_clients
    server = Server(cfg, llm, blocks, assignment, [len(p) for p in partitions])
    server.progress = progress
    if run.last_round:
        server.load(run.path, run.last_round)
    device = next(llm.parameters()).device
    for rnd in range(run.last_round + 1, cfg.fed.rounds + 1):
        t0 = time.time()
        if centralized:  # one LoRA on the pooled data, the same number of steps as all clients together
            pooled = [ex for part in partitions for ex in part]
            jobs = [(0, pooled, cfg.train.local_steps * cfg.fed.num_clients)]
        else:
            jobs = [(k, partitions[k], None) for k in server.sample(rnd)]
        results, lines = [], []
        for k, examples, steps in jobs:
            block = blocks[server.assignment[k]]
            line = {"round": rnd, "client": k, "block": block.id, "sparsity": block.sparsity,
                    "num_examples": len(examples), "tasks": _task_mix(examples)}
            try:
                if inject_failures and k in inject_failures.get(rnd, []):
                    raise LegokitError(f"injected failure of client {k} in round {rnd}")
                init, scaling = server.start_state(k)
                res = local_update(cfg, block, tokenizer, examples, init, scaling, client=k, rnd=rnd,
                                   device=device, progress=progress, train_steps=steps)
                server.validate(res)
                results.append(res)
                line.update(status="ok", **res.metrics)
                line["update_norm"] = float(sum(float((res.scaling * b @ a).square().sum())
                                                for a, b in res.factors.values()) ** 0.5)
            except Exception as err:  # a failing client is recorded; the round goes on without it
                block.release()
                line.update(status="failed", error=f"{type(err).__name__}: {err}",
                            traceback=traceback.format_exc(limit=5))
                if progress:
                    progress_write(f"round {rnd}: client {k} failed: {err}")
            lines.append(line)
        round_line = server.aggregate(rnd, results)
        server.save(run.path, rnd)
        round_line.update(seconds=round(time.time() - t0, 3),
                          failed=[ln["client"] for ln in lines if ln["status"] != "ok"])
        run.finish_round(rnd, lines, round_line)
        if on_round is not None:
            on_round(rnd, round_line)
    server.run = run
    return server


def _task_mix(examples: list) -> dict[str, int]:
    mix: dict[str, int] = {}
    for ex in examples:
        mix[ex.task] = mix.get(ex.task, 0) + 1
    return mix


# ----- evaluation of the outcome -----------------------------------------------------------------
def global_model(server: Server):
    """A context manager yielding the global LLM: merged LLM, or LLM + global adapter (unmasked)."""
    return _Attached(server.llm, server.cfg, None if server.merged else server.global_factors,
                     server.global_scaling, masks=None)


def block_model(server: Server, block_index: int, client: int | None = None):
    """A context manager yielding a block's SLM with the global update applied through its mask."""
    block = server.blocks[block_index]
    if server.merged:
        return _Attached(block.model, server.cfg, None, 1.0, masks=None, release=block)
    factors, scaling = server.start_state(client) if client is not None else (server.global_factors,
                                                                                server.global_scaling)
    return _Attached(block.model, server.cfg, _to_block(block, factors), scaling,
                     masks=block.local_masks(), release=block)


class _Attached:
    def __init__(self, model, cfg, factors, scaling, masks, release=None):
        self.model, self.cfg, self.factors, self.scaling, self.masks = model, cfg, factors, scaling, masks
        self.release = release

    def __enter__(self):
        if self.factors is not None:
            attach_lora(self.model, self.cfg.lora, masks=self.masks, init=self.factors, scaling=self.scaling)
        return self.model

    def __exit__(self, *exc):
        if self.factors is not None:
            detach_lora(self.model)
        if self.release is not None:
            self.release.release()
        return False
