"""The LEGO Studio: compose a federation from a few choices, run it round by round in the background, compare runs.

``Studio`` is the plain-Python controller (testable without widgets): ``config`` turns the choices (clients, each
client's block sparsity, task and data size, aggregator, broadcast, rounds, local steps) into a validated
``ExperimentConfig``; ``start`` checks the data, then drives the library's one round loop
(``federation.Federation.step``) in a background thread, recording each finished round's per-client losses and
the coverage map of one module; ``stop`` ends a run after its current round; ``runs`` keeps every run (finished,
stopped or failed: its finished rounds stay usable); ``compare(a, b)`` sets two of them side by side.
``studio_widget`` puts ipywidgets on top (``legokit.widgets.studio``).

Model and blocks are loaded once per Studio and shared by its runs. A ``merge`` run folds the global update into
the LLM's weights, so the Studio restores those weights after it and gives it freshly loaded blocks.
"""

from __future__ import annotations

import html
import io
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from legokit.config import ExperimentConfig, notebook_config
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
        from legokit.analysis import read_metrics

        if not self.rounds:
            return pd.DataFrame(columns=["round", "client", "block", "step", "global_step", "loss"])
        return read_metrics(self.run_dir)

    def round_losses(self) -> pd.DataFrame:
        """One row per finished round and client: ``round, client, block, sparsity, task, status, loss_first,
        loss_last, error`` (loss NaN for a client that failed)."""
        rows = []
        for ln in self.lines:
            tasks = ln.get("tasks") or {}
            rows.append({"round": ln["round"], "client": ln["client"], "block": ln["block"],
                         "sparsity": ln["sparsity"], "task": ", ".join(sorted(tasks)), "status": ln["status"],
                         "loss_first": ln.get("loss_first", np.nan), "loss_last": ln.get("loss_last", np.nan),
                         "error": ln.get("error")})
        cols = ["round", "client", "block", "sparsity", "task", "status", "loss_first", "loss_last", "error"]
        return pd.DataFrame(rows, columns=cols)

    def round_means(self) -> list[float]:
        """Mean over the clients of the last local step's loss, per finished round (NaN: every client failed)."""
        t = self.round_losses()
        return [float(t[t["round"] == r["round"]]["loss_last"].mean()) for r in self.rounds]


@dataclass
class Comparison:
    """Two runs side by side: a figure, the per-round losses, the config differences and the scores."""

    a: StudioRun
    b: StudioRun
    figure: object
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
        from legokit.data import TASKS

        return list(TASKS)

    @property
    def aggregators(self) -> list[str]:
        from legokit.aggregate import AGGREGATORS

        return list(AGGREGATORS)

    @property
    def broadcasts(self) -> list[str]:
        from legokit.names import BROADCAST_MODES

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
        from legokit.experiment import client_partitions

        parts = client_partitions(cfg)
        sizes = cfg.notebook.get("client_examples")
        return parts if sizes is None else [p[:s] for p, s in zip(parts, sizes, strict=True)]

    # ----- model and blocks ---------------------------------------------------------------------------
    def model(self):
        """The Studio's ``(llm, tokenizer)``, loaded on first use."""
        if self._llm is None:
            from legokit.models import load_model

            self._llm, self._tok = load_model(self.base.model, device=self.base.device, dtype=self.base.dtype)
        return self._llm, self._tok

    def blocks(self, cfg: ExperimentConfig, fresh: bool = False) -> list:
        """The building blocks of ``cfg.prune`` (extracted once, kept under ``workdir``); ``fresh``: loaded
        anew from there (a merge run changes the blocks it holds)."""
        from legokit.experiment import load_or_extract_blocks

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
            run.message = f"run {run.index}: stopping after the current round..."
            self._emit(run)

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
        from legokit.federation import federation

        cfg, total = run.cfg, run.cfg.fed.rounds
        t0 = time.time()
        try:
            self._emit(run, f"run {run.index}: loading {cfg.model}...")
            llm, tok = self.model()
            self._emit(run, f"run {run.index}: building blocks at sparsities {list(cfg.prune.sparsities)}...")
            merge = cfg.fed.broadcast == "merge"
            blocks = self.blocks(cfg, fresh=merge)
            base = self._base_score(llm, tok, cfg) if self.score else None
            saved = _linear_weights(llm, cfg) if merge else None
            try:
                fed = federation(cfg, llm, tok, blocks, run.partitions, run.run_dir, progress=self.progress,
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
        from legokit.aggregate import coverage

        masks = [fed.strategy.block_of(r.client).masks for r in record.results]
        if masks:
            cov = coverage(masks, run.module)
        else:  # nobody was aggregated: nobody covers anything
            cov = torch.zeros(fed.strategy.shapes[run.module], dtype=torch.int32)
        run.coverage[record.round] = cov
        run.lines.extend(record.lines)
        run.rounds.append(record.metrics)

    def _base_score(self, llm, tok, cfg: ExperimentConfig) -> float:
        key = (cfg.model, cfg.eval.ppl_texts, cfg.eval.seq_len, cfg.seed)
        if key not in self._base_ppl:
            self._base_ppl[key] = _perplexity(llm, tok, cfg, self.progress)
        return self._base_ppl[key]

    def _global_score(self, strategy, llm, tok, cfg: ExperimentConfig) -> float | None:
        from legokit.federation import global_model

        if cfg.fed.aggregator == "local":  # no global model
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
        """Two ended runs side by side: loss curves and per-round losses (a figure), the per-round mean loss,
        the config differences, and the held-out perplexity of each global LLM when measured."""
        ra, rb = self.get(a), self.get(b)
        if ra is rb:  # the widget's two menus can name the same run; the table below needs two columns
            others = [r.index for r in self.runs if r is not ra and r.done]
            raise LegokitError(f"run A and run B are both run {ra.index}: pick two different runs to compare"
                               + (f" (ended runs besides it: {others})" if others else
                                  "; press Run again to have a second one"))
        for r in (ra, rb):
            if not r.done:
                raise LegokitError(f"run {r.index} is still running: compare it once it has ended")
        rows = []
        for r in (ra, rb):
            for rec, mean in zip(r.rounds, r.round_means(), strict=True):
                rows.append({"round": rec["round"], "run": f"run {r.index}", "mean loss (last step)": mean})
        table = pd.DataFrame(rows, columns=["round", "run", "mean loss (last step)"])
        if len(table):
            table = table.pivot(index="round", columns="run", values="mean loss (last step)").reset_index()
            table.columns.name = None
        scores = pd.DataFrame([{"run": f"run {r.index}", "status": r.status, "rounds": len(r.rounds),
                                "final mean loss": (r.round_means() or [np.nan])[-1],
                                "held-out ppl": (r.score or {}).get("perplexity", np.nan),
                                "ppl before training": (r.score or {}).get("base", np.nan),
                                "seconds": r.seconds} for r in (ra, rb)])
        return Comparison(ra, rb, plot_compare(ra, rb), table, config_differences(ra.cfg, rb.cfg), scores)


# ----- helpers -------------------------------------------------------------------------------------------
def _digest(obj) -> str:
    import hashlib
    import json
    from dataclasses import asdict, is_dataclass

    def plain(o):
        return asdict(o) if is_dataclass(o) else str(o)

    return hashlib.sha256(json.dumps(obj, default=plain, sort_keys=True).encode()).hexdigest()[:10]


def _default_module(modules: Sequence[str]) -> str:
    """The middle layer's attention output projection (any module when there is none)."""
    o_proj = [m for m in modules if m.endswith("o_proj")]
    pool = o_proj or list(modules)
    return pool[len(pool) // 2]


def _linear_weights(llm, cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    from legokit.models import linear_modules

    return {n: m.weight.detach().clone() for n, m in linear_modules(llm, cfg.lora.target_modules).items()}


@torch.no_grad()
def _restore(llm, saved: Mapping[str, torch.Tensor]) -> None:
    for n, w in saved.items():
        llm.get_submodule(n).weight.copy_(w)


def _perplexity(model, tok, cfg: ExperimentConfig, progress: bool = False) -> float:
    """Held-out perplexity on ``eval.ppl_texts`` Wikipedia paragraphs (``evaluate.window_nlls``)."""
    from legokit.data import eval_texts
    from legokit.evaluate import window_nlls

    windows = window_nlls(model, tok, eval_texts(cfg.eval.ppl_texts, seed=cfg.seed), seq_len=cfg.eval.seq_len,
                          batch_size=cfg.eval.batch_size, progress=progress)
    return float(np.exp(sum(s for s, _ in windows) / sum(k for _, k in windows)))


def _round_message(run: StudioRun, record, total: int) -> str:
    failed = [ln for ln in record.lines if ln["status"] != "ok"]
    mean = run.round_means()[-1]
    text = f"run {run.index}: round {record.round}/{total} finished, mean loss {mean:.3f}"
    for ln in failed:
        text += f"; client {ln['client']} failed: {ln.get('error')}"
    return text


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
    for ln in run.lines:
        if ln["status"] != "ok":
            text += f"; client {ln['client']} failed in round {ln['round']}: {ln.get('error')}"
    return text


def config_differences(a: ExperimentConfig, b: ExperimentConfig) -> pd.DataFrame:
    """Every config key whose value differs between ``a`` and ``b`` (the run names left out): ``key, a, b``."""
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    rows = [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb))
            if k != "name" and fa.get(k) != fb.get(k)]
    return pd.DataFrame(rows, columns=["key", "a", "b"]).astype({"a": str, "b": str})


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----- pictures ------------------------------------------------------------------------------------------
def _figure(ncols: int, width: float, height: float):
    """A Figure not registered with pyplot: safe to draw from the run's thread, never shown twice."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, list(fig.subplots(1, ncols, squeeze=False).ravel())


def _client_label(run: StudioRun, client: int) -> str:
    sp = run.cfg.fed.client_sparsities[client]
    tasks = run.cfg.data.tasks_per_client
    task = ", ".join(tasks[client]) if tasks else ""
    return f"client {client} · {sp:.0%} · {task}"


def plot_losses(run: StudioRun | None):
    """A run's losses: each client's loss per local step over the finished rounds (left), and each client's
    last-step loss per round with their mean (right). Returns a Figure with 2 axes."""
    fig, (ax, ax2) = _figure(2, 4.4, 3.1)
    if run is None or not run.rounds:
        for a in (ax, ax2):
            a.text(0.5, 0.5, "no finished round yet\n(press Run)" if run is None or not run.done
                   else f"run {run.index}: no round finished", ha="center", va="center", transform=a.transAxes)
            a.set(xticks=[], yticks=[])
        if run is not None:
            fig.suptitle(run.label, fontsize=9)
        return fig
    steps, per_round = run.losses(), run.round_losses()
    colors = {c: f"C{c % 10}" for c in range(run.cfg.fed.num_clients)}
    for c, d in steps.groupby("client"):
        for i, (_, g) in enumerate(d.groupby("round")):
            ax.plot(g["global_step"], g["loss"], color=colors[c], marker="o", ms=2.5, lw=1.2,
                    label=_client_label(run, c) if i == 0 else None)
    for r in run.rounds[1:]:
        first = steps[steps["round"] == r["round"]]["global_step"]
        if len(first):
            ax.axvline(first.min() - 0.5, ls="--", color="grey", lw=0.8)
    ax.set(xlabel="local step (rounds one after the other)", ylabel="response loss", title="loss per local step")
    for c, d in per_round.groupby("client"):
        ok = d[d["status"] == "ok"]
        ax2.plot(ok["round"], ok["loss_last"], color=colors[c], marker="o", lw=1)
        bad = d[d["status"] != "ok"]
        if len(bad):
            ax2.plot(bad["round"], [np.nanmin(per_round["loss_last"]) if per_round["loss_last"].notna().any()
                                    else 0.0] * len(bad), "x", color=colors[c], ms=8, label=f"client {c} failed")
    rounds = [r["round"] for r in run.rounds]
    ax2.plot(rounds, run.round_means(), color="black", marker="s", lw=2, label="mean")
    ax2.set(xlabel="round", ylabel="loss at the round's last step", title="per round", xticks=rounds)
    if len(steps):
        ax.legend(fontsize=7)
    ax2.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for a in (ax, ax2):
        a.title.set_fontsize(9)
    fig.suptitle(run.label, fontsize=9)
    return fig


def plot_run_coverage(run: StudioRun | None, rnd: int | None = None):
    """The coverage map of the run's module in round ``rnd`` (default: the last finished round)."""
    from legokit.viz import plot_coverage_map

    if run is None or not run.coverage:
        fig, (ax,) = _figure(1, 4.4, 3.1)
        ax.text(0.5, 0.5, "coverage appears\nafter the first round", ha="center", va="center", transform=ax.transAxes)
        ax.set(xticks=[], yticks=[])
        return fig
    rnd = max(run.coverage) if rnd is None else rnd
    clients = sum(1 for ln in run.lines if ln["round"] == rnd and ln["status"] == "ok")
    return plot_coverage_map(run.coverage[rnd], title=f"run {run.index}, round {rnd}: {run.module}\n"
                                                      f"owners among the {clients} aggregated clients")


def plot_compare(a: StudioRun, b: StudioRun):
    """Two runs side by side: the clients' mean loss per local step, the mean last-step loss per round, and (when
    both runs were scored) how much each run changed the global LLM's held-out perplexity. Returns a Figure with
    2 or 3 axes."""
    from matplotlib.ticker import MaxNLocator

    scored = all(r.score and r.score.get("perplexity") is not None for r in (a, b))
    fig, axes = _figure(3 if scored else 2, 3.6, 3.1)
    ax, ax2 = axes[:2]
    runs = ((a, "-", "#3b75af"), (b, "--", "#d1603d"))
    names = [f"run {r.index}: {r.cfg.fed.aggregator}/{r.cfg.fed.broadcast}" for r, _, _ in runs]
    for (r, style, color), name in zip(runs, names, strict=True):
        steps = r.losses()
        if len(steps):
            mean = steps.groupby("global_step")["loss"].mean()
            ax.plot(mean.index, mean.values, style, color=color, marker="o", ms=3, label=name)
        ax2.plot([rec["round"] for rec in r.rounds], r.round_means(), style, color=color, marker="s", label=name)
    ax.set(xlabel="local step (rounds one after the other)", ylabel="mean response loss over clients",
           title="loss per local step")
    ax2.set(xlabel="round", ylabel="mean loss at the round's last step", title="per round",
            xticks=sorted({rec["round"] for r in (a, b) for rec in r.rounds}))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if scored:
        ax3 = axes[2]
        change = [r.score["perplexity"] - r.score["base"] for r, _, _ in runs]
        ax3.bar([0, 1], change, color=[c for _, _, c in runs])
        ax3.axhline(0, color="black", lw=0.8)
        ax3.set(xticks=[0, 1], xticklabels=[f"run {a.index}", f"run {b.index}"], ylabel="perplexity change",
                title=f"held-out perplexity after - before\n(before: {a.score['base']:.2f})")
    for x in axes:
        x.title.set_fontsize(9)
    for x in (ax, ax2):
        if x.lines:
            x.legend(fontsize=7)
    return fig


def png(fig, dpi: int = 80) -> bytes:
    """The PNG bytes of a Figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ----- the widget ----------------------------------------------------------------------------------------
def studio_widget(st: Studio, max_clients: int = 8):
    """The Studio as ipywidgets: controls, Run / Stop, a status line, live loss and coverage pictures, and a
    compare panel. CSS classes: ``legokit-studio`` (the box), ``legokit-studio-run``, ``-stop``, ``-status``,
    ``-losses``, ``-coverage``, ``-compare`` (the panel), ``-compare-button``.

    Returns:
        a ``VBox`` with ``.studio`` (the controller), ``.values()`` (the current choices, ``Studio.config``'s
        arguments), ``.controls``, ``.clients`` (one row of controls per client), ``.run_button``,
        ``.stop_button``, ``.status``, ``.losses``, ``.coverage`` (``Image`` widgets of PNG bytes),
        ``.compare_a``, ``.compare_b``, ``.compare_button``, ``.compare_image``, ``.compare_table``.
    """
    import ipywidgets as W

    d = st.defaults()
    levels = [(f"{s:.0%}", s) for s in st.levels]
    wide = W.Layout(width="220px")
    controls = {
        "clients": W.BoundedIntText(value=d["clients"], min=1, max=max_clients, description="clients",
                                    layout=wide),
        "aggregator": W.Dropdown(options=st.aggregators, value=d["aggregator"], description="aggregator",
                                 layout=wide),
        "broadcast": W.Dropdown(options=st.broadcasts, value=d["broadcast"], description="broadcast", layout=wide),
        "rounds": W.BoundedIntText(value=d["rounds"], min=1, max=50, description="rounds", layout=wide),
        "local_steps": W.BoundedIntText(value=d["local_steps"], min=1, max=500, description="local steps",
                                        layout=wide),
    }
    rows_box = W.VBox()
    rows: list[dict] = []

    def client_row(k: int) -> dict:
        prev = rows[k] if k < len(rows) else None
        sp = prev["sparsity"].value if prev else d["sparsities"][k % len(d["sparsities"])]
        task = prev["task"].value if prev else d["tasks"][k % len(d["tasks"])]
        ex = prev["examples"].value if prev else d["examples"][k % len(d["examples"])]
        return {"sparsity": W.Dropdown(options=levels, value=sp, description="sparsity",
                                       layout=W.Layout(width="170px")),
                "task": W.Dropdown(options=st.tasks, value=task, description="task", layout=W.Layout(width="240px")),
                "examples": W.BoundedIntText(value=ex, min=0, max=100_000, description="examples",
                                             layout=W.Layout(width="170px"))}

    def rebuild(_=None):
        rows[:] = [client_row(k) for k in range(controls["clients"].value)]
        rows_box.children = [W.HBox([W.HTML(f"<b>client {k}</b>", layout=W.Layout(width="60px")),
                                     r["sparsity"], r["task"], r["examples"]]) for k, r in enumerate(rows)]

    controls["clients"].observe(rebuild, names="value")
    rebuild()

    run_button = W.Button(description="Run", button_style="success", icon="play")
    stop_button = W.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
    status = W.HTML(value="Choose the federation, then press <b>Run</b>.")
    losses = W.Image(value=png(plot_losses(None)), format="png")
    cover = W.Image(value=png(plot_run_coverage(None)), format="png")
    compare_a = W.Dropdown(options=[], description="run A", layout=W.Layout(width="380px"))
    compare_b = W.Dropdown(options=[], description="run B", layout=W.Layout(width="380px"))
    compare_button = W.Button(description="compare", icon="columns")
    compare_image = W.Image(format="png")
    compare_table = W.HTML()
    panel = W.VBox([W.HTML("<b>Compare two runs</b>"), W.HBox([compare_a, compare_b, compare_button]),
                    compare_image, compare_table])
    for w, cls in ((run_button, "run"), (stop_button, "stop"), (status, "status"), (losses, "losses"),
                   (cover, "coverage"), (panel, "compare"), (compare_button, "compare-button")):
        w.add_class(f"legokit-studio-{cls}")

    def values() -> dict:
        return {**{k: c.value for k, c in controls.items()}, "sparsities": [r["sparsity"].value for r in rows],
                "tasks": [r["task"].value for r in rows], "examples": [r["examples"].value for r in rows]}

    def say(text: str, error: bool = False) -> None:
        color = "#b00" if error else "#222"
        cls = "legokit-error" if error else "legokit-studio-message"
        status.value = f'<span class="{cls}" style="color:{color}">{html.escape(text)}</span>'

    def show(run: StudioRun) -> None:  # from the run's thread: set values, never `with output:`
        say(run.message, error=run.status == "failed")
        if run.rounds or run.done:
            losses.value = png(plot_losses(run))
            cover.value = png(plot_run_coverage(run))
        running = not run.done
        run_button.disabled, stop_button.disabled = running, not running
        if run.done:  # offer the ended runs; preselect the newest against the one before it
            options = [(r.label, r.index) for r in st.runs if r.done]
            compare_a.options, compare_b.options = options, options
            indexes = [i for _, i in options]
            compare_a.value, compare_b.value = indexes[max(0, len(indexes) - 2)], indexes[-1]

    def on_run(_=None) -> None:
        try:
            st.start(**values())
        except LegokitError as err:
            say(str(err), error=True)

    def on_compare(_=None) -> None:
        if compare_a.value is None or compare_b.value is None:
            say("compare needs two ended runs: press Run twice first", error=True)
            return
        try:
            cmp = st.compare(compare_a.value, compare_b.value)
        except LegokitError as err:
            say(str(err), error=True)
            return
        compare_image.value = png(cmp.figure)
        compare_table.value = cmp._repr_html_()

    st.on_update(show)
    run_button.on_click(on_run)
    stop_button.on_click(lambda _: st.stop())
    compare_button.on_click(on_compare)
    box = W.VBox([W.HTML("<h3>LEGO Studio</h3>"), W.HBox([W.VBox(list(controls.values())[:3]),
                                                          W.VBox(list(controls.values())[3:])]),
                  rows_box, W.HBox([run_button, stop_button]), status, W.HBox([losses, cover]), panel])
    box.add_class("legokit-studio")
    box.studio, box.values, box.controls, box.clients = st, values, controls, rows
    box.run_button, box.stop_button, box.status, box.losses, box.coverage = (run_button, stop_button, status,
                                                                             losses, cover)
    box.compare_a, box.compare_b, box.compare_button = compare_a, compare_b, compare_button
    box.compare_image, box.compare_table = compare_image, compare_table
    return box
