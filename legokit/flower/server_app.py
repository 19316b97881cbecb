"""The Flower ServerApp: load the LLM and its blocks, then run ``FlowerStrategy`` over the Grid.

Component reference for a Flower app: ``legokit.flower.server_app:app``. The run config (see
``legokit.flower.runconfig``) carries the experiment; the ServerApp writes the same run directory as
``legokit run`` (``config.yaml``, ``blocks/``, ``adapters/round_NNN/`` in peft format, ``metrics.jsonl``,
``rounds.jsonl``, ``state.json``) plus ``nodes.json`` (which SuperNode served which client) and
``flower.json`` (a summary with bytes per round).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from legokit.checkpoint import Checkpoint
from legokit.experiment import load_or_extract_blocks
from legokit.flower.runconfig import check_supported, from_run_config
from legokit.flower.strategy import FlowerStrategy
from legokit.models import load_model
from legokit.strategy import build_strategy
from legokit.utils import atomic_write_json, seed_everything

logger = logging.getLogger("legokit.flower")


def _log(line: str) -> None:
    # Flower's ServerApp log (shown by `flwr run --stream` / `flwr log`) carries stdout.
    print(f"[legokit] {line}", flush=True)


def run_server(grid: Grid, run_config: Mapping[str, Any], *, run_id: int = 0, progress: bool = False):
    """The ServerApp's work, callable without Flower's runtime (tests, simulation).

    Returns:
        The ``FlowerStrategy`` after the last round (its ``lego`` holds the final global state).
    """
    import torch


    t0 = time.time()
    cfg, opts = from_run_config(run_config)
    check_supported(cfg, opts)
    run_dir = Path(opts.run_dir or f"runs/flower-{run_id}").resolve()
    seed_everything(cfg.seed)
    torch.use_deterministic_algorithms(False)
    checkpoint = Checkpoint(run_dir, cfg, opts.resume)  # fails fast on a run directory of another config
    llm, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    blocks = load_or_extract_blocks(cfg, llm, tok, run_dir, progress)
    _log(f"run directory {run_dir}; blocks {[b.id for b in blocks]}")
    strategy = FlowerStrategy(build_strategy(cfg, llm, blocks, progress=progress), checkpoint, opts, log=_log)
    if checkpoint.last_round:
        _log(f"resuming after round {checkpoint.last_round}")
    strategy.start(grid)
    rounds = checkpoint.rounds
    summary = {
        "flower_run_id": run_id, "run_dir": str(run_dir), "rounds": len(rounds),
        "clients": {str(k): node for k, node in sorted(strategy.clients.items())},
        "bytes_per_round": [{"round": r["round"], "down": r.get("bytes_down", 0), "up": r.get("bytes_up", 0)}
                            for r in rounds],
        "failed_per_round": {str(r["round"]): r.get("failed", []) for r in rounds},
        "seconds_per_round": [r.get("seconds") for r in rounds],
        "seconds": round(time.time() - t0, 3),
        "final_adapter": str(run_dir / "adapters" / f"round_{cfg.fed.rounds:03d}"),
        "secagg": [r["secagg"] for r in rounds if "secagg" in r] if opts.secagg else None,
    }
    atomic_write_json(run_dir / "flower.json", summary)
    _log(f"done: {len(rounds)} rounds in {summary['seconds']} s; summary in {run_dir / 'flower.json'}")
    return strategy


def make_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is ``defaults`` overridden by Flower's run config.

    The simulation engine's Python entry point passes no run config, so ``legokit.flower.simulation.simulate``
    binds it here; a deployment gets it from the app's ``pyproject.toml`` and ``flwr run -c``.
    """
    server_app = ServerApp()
    bound = dict(defaults or {})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, {**bound, **dict(context.run_config)}, run_id=context.run_id)

    return server_app


app = make_server_app()
