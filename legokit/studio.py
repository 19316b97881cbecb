"""The LEGO Studio's controller: compose a federation from a few choices, run it round by round in the background,
compare runs. Its pictures are ``legokit.viz.studio``'s, its ipywidgets ``legokit.widgets.studio``'s: this module
imports neither (nor matplotlib).

``Studio.config`` turns the choices (clients, each client's block sparsity, task and data size, aggregator,
broadcast, rounds, local steps) into a validated ``ExperimentConfig``; ``start`` checks the data, then drives the
library's one round loop (``federation.Federation.step``) in a background thread, recording each finished round's
per-client losses and the coverage map of one module; ``stop`` ends a run after its current round; ``runs`` keeps
every run (finished, stopped or failed: its finished rounds stay usable); ``compare(a, b)`` sets two side by side.
Model and blocks are loaded once per Studio and shared by its runs; a ``merge`` run folds the global update into
the LLM's weights, so the Studio restores them after it and gives it freshly loaded blocks.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from legokit.aggregate import AGGREGATORS, coverage
from legokit.analysis import read_metrics
from legokit.config import ExperimentConfig, notebook_config
from legokit.data import TASKS, eval_texts
from legokit.evaluate import perplexity
from legokit.experiment import client_partitions, load_or_extract_blocks
from legokit.federation import build_federation, global_model
from legokit.models import linear_modules, load_model
from legokit.names import BROADCAST_MODES
from legokit.report import flatten
from legokit.utils import LegokitError

NOTEBOOK = "05_studio"
FINAL = ("finished", "stopped", "failed")


@dataclass
class StudioRun:
    """One Run of the Studio: its config, data, and what its finished rounds recorded.

    Attributes:
        index, label: the run's number (1, 2, ...) and a one-line name for menus.
        cfg: the experiment config the run was built from (also in ``run_dir/config.yaml``).
        partitions: each client's training examples.
        status: ``running``, ``finished``, ``stopped`` (after a round, on request) or ``failed``.
        message: the last status line (what the widget shows).
        rounds: each finished round's metrics line (``Federation.rounds``).
        lines: each finished round's per-client metrics lines (``metrics.jsonl``: losses, status, error).
        coverage: ``{round: int (out, in)}`` owner counts of ``module`` over the clients aggregated that round.
        error: why the run failed (``None`` unless ``status == "failed"``).
        score: held-out perplexity of the global LLM after the run, and of the LLM before any run (``base``).
    """

    index: int
    cfg: ExperimentConfig
    partitions: list[list]
    run_dir: Path
    status: str = "running"
    message: str = ""
    rounds: list[dict] = field(default_factory=list)
    lines: list[dict] = field(default_factory=list)
    coverage: dict[int, torch.Tensor] = field(default_factory=dict)
    module: str | None = None
    error: str | None = None
    traceback: str | None = None
    score: dict | None = None
    seconds: float = 0.0

    @property
    def label(self) -> str:
        fed = self.cfg.fed
        return (f"run {self.index}: {fed.aggregator}/{fed.broadcast}, {fed.num_clients} clients, "
                f"{len(self.rounds)}/{fed.rounds} rounds ({self.status})")

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def losses(self) -> pd.DataFrame:
        """Per-step losses of the finished rounds (``analysis.read_metrics`` columns); failed clients have none."""
        if not self.rounds:
            return pd.DataFrame(columns=["round", "client", "block", "step", "global_step", "loss"])
        return read_metrics(self.run_dir)

    def round_losses(self) -> pd.DataFrame:
        """One row per finished round and client: ``round, client, block, sparsity, task, status, loss_first,
        loss_last, error`` (loss NaN for a client that failed)."""
        rows = [{"round": ln["round"], "client": ln["client"], "block": ln["block"], "sparsity": ln["sparsity"],
                 "task": ", ".join(sorted(ln.get("tasks") or {})), "status": ln["status"],
                 "loss_first": ln.get("loss_first", np.nan), "loss_last": ln.get("loss_last", np.nan),
                 "error": ln.get("error")} for ln in self.lines]
        cols = ["round", "client", "block", "sparsity", "task", "status", "loss_first", "loss_last", "error"]
        return pd.DataFrame(rows, columns=cols)

    def round_means(self) -> list[float]:
        """Mean over the clients of the last local step's loss, per finished round (NaN: every client failed)."""
        t = self.round_losses()
        return [float(t[t["round"] == r["round"]]["loss_last"].mean()) for r in self.rounds]


@dataclass
class Comparison:
    """Two runs side by side: the runs (their loss curves), the per-round losses, the config differences and the
    scores. Data only: ``legokit.viz.plot_compare(comparison)`` draws it."""

    a: StudioRun
    b: StudioRun
    rounds: pd.DataFrame
    differences: pd.DataFrame
    scores: pd.DataFrame

    def _repr_html_(self) -> str:
        return (f"<b>per-round mean loss</b>{self.rounds.to_html(index=False, float_format='%.4f')}"
                f"<b>scores</b>{self.scores.to_html(index=False, float_format='%.4f')}"
                f"<b>config differences</b>{self.differences.to_html(index=False)}")


class Studio:
    """Compose, run, stop and compare LEGO federations; the controller behind ``legokit.widgets.studio``.

    Args:
        profile: the sizes to start from (``configs/notebooks/05_studio-<profile>.yaml``, else
            ``configs/<profile>.yaml``).
        model: override the profile's model (e.g. ``"tiny-llama"``).
        overrides: further dotted config overrides (``{"train.lr": 1e-3}``).
        workdir: where run directories (``runs/``) and extracted blocks (``blocks/``) go (default: a new temporary
            directory).
        llm, tokenizer: an already loaded model to use (else loaded on the first Run).
        module: the module whose coverage map is drawn (default: the middle layer's ``o_proj``).
        score: after each run, measure the global LLM's held-out perplexity (``eval.ppl_texts`` paragraphs).
        progress: show progress bars while running.
    """

    def __init__(self, profile: str = "quick", model: str | None = None, *,
                 overrides: Mapping | None = None, workdir: str | Path | None = None, llm=None, tokenizer=None,
                 module: str | None = None, score: bool = True, progress: bool = False):
        over = dict(overrides or {})
        if model is not None:
            over["model"] = model
        self.base = notebook_config(NOTEBOOK, profile, over)
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="legokit-studio-"))
        self.module, self.score, self.progress = module, score, progress
        self.runs: list[StudioRun] = []
        self._llm, self._tok = llm, tokenizer
        self._blocks: dict[str, list] = {}
        self._base_ppl: dict[tuple, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[StudioRun], None]] = []

    # ----- the choices --------------------------------------------------------------------------------
    @property
    def levels(self) -> list[float]:
        """The block sparsities a client can hold (``prune.sparsities``)."""
        return list(self.base.prune.sparsities)

    @property
    def tasks(self) -> list[str]:
        """The tasks a client can train on (``legokit.data.TASKS``)."""
        return list(TASKS)

    @property
    def aggregators(self) -> list[str]:
        return list(AGGREGATORS)

    @property
    def broadcasts(self) -> list[str]:
        return list(BROADCAST_MODES)

    def defaults(self) -> dict:
        """The profile's choices: ``clients, sparsities, tasks, examples`` (per client), ``aggregator``,
        ``broadcast``, ``rounds``, ``local_steps``."""
        b = self.base
        n = b.fed.num_clients
        sparsities = b.fed.client_sparsities or [self.levels[k % len(self.levels)] for k in range(n)]
        return {"clients": n, "sparsities": list(sparsities),
                "tasks": [b.data.tasks[k % len(b.data.tasks)] for k in range(n)],
                "examples": [max(1, b.data.train_examples // n)] * n, "aggregator": b.fed.aggregator,
                "broadcast": b.fed.broadcast, "rounds": b.fed.rounds, "local_steps": b.train.local_steps}

    def config(self, clients: int | None = None, *, sparsities: float | Sequence[float] | None = None,
               tasks: str | Sequence[str] | None = None, examples: int | Sequence[int] | None = None,
               aggregator: str | None = None, broadcast: str | None = None, rounds: int | None = None,
               local_steps: int | None = None, seed: int | None = None) -> ExperimentConfig:
        """The validated config of one Run; unset choices take ``defaults()``.

        Args:
            clients: how many clients.
            sparsities, tasks: one per client (a single value: every client).
            examples: a list: each client's number of training examples; an int: the pooled total, split
                between the clients as ``experiment.client_partitions`` splits it.
        Raises:
            LegokitError: an impossible combination (the message says which and how to fix it).
        """
        d = self.defaults()
        n = d["clients"] if clients is None else int(clients)
        if n < 1:
            raise LegokitError(f"clients={n}: a federation needs at least one client")

        def per_client(value, default, what):
            if value is None:
                value = default if len(default) == n else [default[k % len(default)] for k in range(n)]
            if isinstance(value, (str, int, float)):
                value = [value] * n
            value = list(value)
            if len(value) != n:
                raise LegokitError(f"{len(value)} {what} for {n} clients: give one per client")
            return value

        sp = [float(s) for s in per_client(sparsities, d["sparsities"], "sparsities")]
        ts = per_client(tasks, d["tasks"], "tasks")
        over = {"fed.num_clients": n, "fed.client_sparsities": sp, "fed.devices": None,
                "fed.aggregator": aggregator or d["aggregator"], "fed.broadcast": broadcast or d["broadcast"],
                "fed.rounds": int(d["rounds"] if rounds is None else rounds),
                "train.local_steps": int(d["local_steps"] if local_steps is None else local_steps),
                "data.partition": "task", "data.tasks": list(dict.fromkeys(ts)),
                "data.tasks_per_client": [[t] for t in ts]}
        if seed is not None:
            over["seed"] = int(seed)
        if isinstance(examples, (int, np.integer)):  # the pooled total
            total = int(examples)
            if total < n:
                raise LegokitError(f"{n} clients but only {total} examples: every client needs at least one; "
                                   "use fewer clients or more examples")
            over["data.train_examples"] = total
            over["notebook.client_examples"] = None
        else:
            sizes = [int(x) for x in per_client(examples, d["examples"], "data sizes")]
            empty = [k for k, x in enumerate(sizes) if x < 1]
            if empty:
                raise LegokitError(f"client {empty[0]} has a data size of {sizes[empty[0]]}: every client needs "
                                   "at least one training example")
            # client_partitions draws the same number per task and splits a task evenly among its holders:
            # draw enough that every holder gets its size, then keep the first `size` of each client's share
            per_task = max(ts.count(t) * max(s for s, u in zip(sizes, ts, strict=True) if u == t)
                           for t in set(ts))
            over["data.train_examples"] = per_task * len(over["data.tasks"])
            over["notebook.client_examples"] = sizes
        return self.base.with_overrides(over)

    def partitions(self, cfg: ExperimentConfig) -> list[list]:
        """Each client's training examples under ``cfg`` (``experiment.client_partitions``, cut to the
        per-client sizes ``notebook.client_examples`` when the config has them)."""
        parts = client_partitions(cfg)
        sizes = cfg.notebook.get("client_examples")
        return parts if sizes is None else [p[:s] for p, s in zip(parts, sizes, strict=True)]

    # ----- model and blocks ---------------------------------------------------------------------------
    def model(self):
        """The Studio's ``(llm, tokenizer)``, loaded on first use."""
        if self._llm is None:
            self._llm, self._tok = load_model(self.base.model, device=self.base.device, dtype=self.base.dtype)
        return self._llm, self._tok

    def blocks(self, cfg: ExperimentConfig, fresh: bool = False) -> list:
        """The building blocks of ``cfg.prune`` (extracted once, kept under ``workdir``); ``fresh``: loaded
        anew from there (a merge run changes the blocks it holds)."""
        key = "prune-" + _digest({"prune": cfg.prune, "seed": cfg.seed, "model": cfg.model})
        if fresh or key not in self._blocks:
            llm, tok = self.model()
            blocks = load_or_extract_blocks(cfg, llm, tok, self.workdir / "blocks" / key, progress=self.progress)
            if fresh:
                return blocks
            self._blocks[key] = blocks
        return self._blocks[key]

    # ----- running ------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_update(self, listener: Callable[[StudioRun], None]) -> None:
        """Call ``listener(run)`` whenever a run changes (started, a round finished, ended); from the run's
        thread."""
        self._listeners.append(listener)

    def start(self, *, inject_failures: Mapping[int, list[int]] | None = None, **choices) -> StudioRun:
        """Check the choices and the data, then run the federation in a background thread.

        Args:
            choices: ``config``'s arguments.
            inject_failures: ``{round: [client, ...]}`` clients that fail in that round (``federation``'s).
        Returns:
            the new run (also ``runs[-1]``), running.
        Raises:
            LegokitError: a run is still going, or the choices are impossible; nothing starts.
        """
        if self.running:
            raise LegokitError(f"run {self.runs[-1].index} is still running: press Stop or wait for it")
        cfg = self.config(**choices)
        parts = self.partitions(cfg)  # data problems show now, before any heavy work
        index = len(self.runs) + 1
        (self.workdir / "runs").mkdir(parents=True, exist_ok=True)  # a new directory, also when Studios share one
        run_dir = Path(tempfile.mkdtemp(prefix=f"run-{index:03d}-", dir=self.workdir / "runs"))
        run = StudioRun(index, cfg.with_overrides({"name": f"studio-run-{index}"}), parts, run_dir,
                        message=f"run {index}: starting")
        self.runs.append(run)
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, args=(run, inject_failures), daemon=True,
                                        name=f"legokit-studio-run-{index}")
        self._emit(run)  # before the thread's own messages
        self._thread.start()
        return run

    def run(self, **choices) -> StudioRun:
        """``start`` and ``wait``: one whole run, for scripts and tests."""
        self.start(**choices)
        return self.wait()

    def stop(self) -> None:
        """Stop the current run after its current round (its finished rounds are kept)."""
        if self.running and not self._stop.is_set():
            self._stop.set()
            run = self.runs[-1]
            self._emit(run, f"run {run.index}: stopping after the current round...")

    def wait(self, timeout: float | None = None) -> StudioRun | None:
        """Wait for the current run's thread to end; returns the last run."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.runs[-1] if self.runs else None

    def _emit(self, run: StudioRun, message: str | None = None) -> None:
        if message is not None:
            run.message = message
        for listener in list(self._listeners):
            try:
                listener(run)
            except Exception:  # a broken picture must not end the run
                traceback.print_exc()

    def _work(self, run: StudioRun, inject_failures) -> None:
        cfg, total = run.cfg, run.cfg.fed.rounds
        t0 = time.time()
        try:
            self._emit(run, f"run {run.index}: loading {cfg.model}...")
            llm, tok = self.model()
            self._emit(run, f"run {run.index}: building blocks at sparsities {list(cfg.prune.sparsities)}...")
            merge = cfg.fed.broadcast == "merge"
            blocks = self.blocks(cfg, fresh=merge)
            base = self._base_score(llm, tok, cfg) if self.score else None
            saved = ({n: m.weight.detach().clone() for n, m in linear_modules(llm, cfg.lora.target_modules).items()}
                     if merge else None)  # the LLM's weights, restored after a merge run
            try:
                fed = build_federation(cfg, llm, tok, blocks, run.partitions, run.run_dir, progress=self.progress,
                                 inject_failures=inject_failures)
                run.module = self.module or _default_module(fed.strategy.modules)
                while not fed.done:
                    if self._stop.is_set():
                        run.status = "stopped"
                        break
                    self._emit(run, f"run {run.index}: round {fed.round + 1}/{total} running...")
                    record = fed.step()
                    self._record(run, fed, record)
                    self._emit(run, _round_message(run, record, total))
                if run.rounds and base is not None:
                    run.score = {"perplexity": self._global_score(fed.strategy, llm, tok, cfg), "base": base}
            finally:
                if saved is not None:
                    _restore(llm, saved)
        except Exception as err:  # the run ends; its finished rounds stay usable
            run.status, run.error = "failed", f"{type(err).__name__}: {err}"
            run.traceback = traceback.format_exc(limit=8)
        run.seconds = round(time.time() - t0, 1)
        if run.status == "running":
            run.status = "finished"
        self._emit(run, _end_message(run))

    def _record(self, run: StudioRun, fed, record) -> None:
        masks = [fed.strategy.block_of(r.client).masks for r in record.results]
        # nobody aggregated: nobody covers anything
        run.coverage[record.round] = (coverage(masks, run.module) if masks else
                                      torch.zeros(fed.strategy.shapes[run.module], dtype=torch.int32))
        run.lines.extend(record.lines)
        run.rounds.append(record.metrics)

    def _base_score(self, llm, tok, cfg: ExperimentConfig) -> float:
        key = (cfg.model, cfg.eval.ppl_texts, cfg.eval.seq_len, cfg.seed)
        if key not in self._base_ppl:
            self._base_ppl[key] = _perplexity(llm, tok, cfg, self.progress)
        return self._base_ppl[key]

    def _global_score(self, strategy, llm, tok, cfg: ExperimentConfig) -> float | None:
        if not strategy.has_global:  # the local reference
            return None
        with global_model(strategy, llm) as model:
            return _perplexity(model, tok, cfg, self.progress)

    # ----- comparing ----------------------------------------------------------------------------------
    def get(self, run: int | StudioRun) -> StudioRun:
        """A run by its number (1, 2, ...) or itself."""
        if isinstance(run, StudioRun):
            return run
        for r in self.runs:
            if r.index == run:
                return r
        raise LegokitError(f"no run {run!r}: the Studio has runs {[r.index for r in self.runs]}")

    def compare(self, a: int | StudioRun, b: int | StudioRun) -> Comparison:
        """Two ended runs side by side: the runs (for their loss curves; ``viz.plot_compare`` draws them), the
        per-round mean loss, the config differences, and the held-out perplexity of each global LLM when measured."""
        ra, rb = self.get(a), self.get(b)
        if ra is rb:  # the widget's two menus can name the same run; the table below needs two columns
            others = [r.index for r in self.runs if r is not ra and r.done]
            raise LegokitError(f"run A and run B are both run {ra.index}: pick two different runs to compare"
                               + (f" (ended runs besides it: {others})" if others else
                                  "; press Run again to have a second one"))
        for r in (ra, rb):
            if not r.done:
                raise LegokitError(f"run {r.index} is still running: compare it once it has ended")
        rows = [{"round": rec["round"], "run": f"run {r.index}", "mean loss (last step)": mean}
                for r in (ra, rb) for rec, mean in zip(r.rounds, r.round_means(), strict=True)]
        table = pd.DataFrame(rows, columns=["round", "run", "mean loss (last step)"])
        if len(table):
            table = table.pivot(index="round", columns="run", values="mean loss (last step)").reset_index()
            table.columns.name = None
        scores = pd.DataFrame([{"run": f"run {r.index}", "status": r.status, "rounds": len(r.rounds),
                                "final mean loss": (r.round_means() or [np.nan])[-1],
                                "held-out ppl": (r.score or {}).get("perplexity", np.nan),
                                "ppl before training": (r.score or {}).get("base", np.nan),
                                "seconds": r.seconds} for r in (ra, rb)])
        return Comparison(ra, rb, table, config_differences(ra.cfg, rb.cfg), scores)


def _digest(obj) -> str:
    text = json.dumps(obj, default=lambda o: asdict(o) if is_dataclass(o) else str(o), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _default_module(modules: Sequence[str]) -> str:
    """The middle layer's attention output projection (any module when there is none)."""
    pool = [m for m in modules if m.endswith("o_proj")] or list(modules)
    return pool[len(pool) // 2]


@torch.no_grad()
def _restore(llm, saved: Mapping[str, torch.Tensor]) -> None:
    for n, w in saved.items():
        llm.get_submodule(n).weight.copy_(w)


def _perplexity(model, tok, cfg: ExperimentConfig, progress: bool) -> float:
    """Held-out perplexity on ``eval.ppl_texts`` Wikipedia paragraphs (``evaluate.perplexity``)."""
    return perplexity(model, tok, eval_texts(cfg.eval.ppl_texts, seed=cfg.seed), seq_len=cfg.eval.seq_len,
                      batch_size=cfg.eval.batch_size, progress=progress)


def _round_message(run: StudioRun, record, total: int) -> str:
    text = f"run {run.index}: round {record.round}/{total} finished, mean loss {run.round_means()[-1]:.3f}"
    return text + "".join(f"; client {ln['client']} failed: {ln.get('error')}"
                          for ln in record.lines if ln["status"] != "ok")


def _end_message(run: StudioRun) -> str:
    done, total = len(run.rounds), run.cfg.fed.rounds
    if run.status == "failed":
        kept = f"rounds 1-{done} kept" if done > 1 else ("round 1 kept" if done else "no round finished")
        return f"run {run.index} failed in round {done + 1}/{total}: {run.error} ({kept})"
    if run.status == "stopped":
        return f"run {run.index} stopped after round {done}/{total} (finished rounds kept)"
    text = f"run {run.index} finished: round {done}/{total} finished in {run.seconds:.0f} s"
    if run.score and run.score.get("perplexity") is not None:
        text += f"; held-out perplexity {run.score['base']:.2f} -> {run.score['perplexity']:.2f}"
    return text + "".join(f"; client {ln['client']} failed in round {ln['round']}: {ln.get('error')}"
                          for ln in run.lines if ln["status"] != "ok")


def config_differences(a: ExperimentConfig, b: ExperimentConfig) -> pd.DataFrame:
    """Every config key (``report.flatten``'s) whose value differs between ``a`` and ``b``, the run names left
    out: ``key, a, b``."""
    da, db = a.to_dict(), b.to_dict()
    rows = [{"key": k, "a": _value_at(da, k), "b": _value_at(db, k)}
            for k in sorted(set(flatten(da)) | set(flatten(db))) if k != "name"]
    rows = [r for r in rows if r["a"] != r["b"]]
    return pd.DataFrame(rows, columns=["key", "a", "b"]).astype({"a": str, "b": str})


def _value_at(d: Mapping, key: str):
    """The value under a dotted ``key`` of nested mappings (``None`` where there is none)."""
    for part in key.split("."):
        d = d.get(part) if isinstance(d, Mapping) else None
    return d
