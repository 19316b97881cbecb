"""A run directory as a checkpoint: every finished round is written atomically, and a run resumes after it.

Layout: ``config.yaml``; ``adapters/round_NNN/`` (the global state after round N, written by the strategy's
broadcast: a peft adapter, per-client adapters, or the merged weights and blocks); ``metrics.jsonl`` (a line
per client and round); ``rounds.jsonl`` (a line per round); ``state.json`` (the last finished round: the commit
point, written last). A crash between two commits leaves the previous round's state, which ``Checkpoint``
resumes from; a ``.partial`` folder of the crashed round is discarded.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Protocol

from legokit.config import ExperimentConfig, first_difference
from legokit.utils import LegokitError, atomic_write_json, atomic_write_text


class State(Protocol):
    """What a checkpoint saves: the global state of a round (``LegoStrategy``)."""

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path, rnd: int) -> None: ...


class Checkpoint:
    """The run directory of one experiment: its config, finished rounds and their records.

    Args:
        path: the run directory (created).
        cfg: the experiment; a directory that holds another config's run is refused.
        resume: continue the run the directory holds (an error when it holds none); else it must hold no run.
    """

    def __init__(self, path: str | Path, cfg: ExperimentConfig, resume: bool):
        self.path = Path(path)
        self.cfg = cfg
        cfg_file = self.path / "config.yaml"
        self.last_round = 0
        self.metrics: list[dict] = []
        self.rounds: list[dict] = []
        holds_run = (self.path / "state.json").is_file() or (self.path / "results.json").is_file()
        if cfg_file.is_file():
            old = ExperimentConfig.from_yaml(cfg_file)
            if not resume and holds_run:
                raise LegokitError(f"run directory {self.path} already holds a run: pass resume=True "
                                   "(--resume) to continue it, or choose another output directory")
            if resume and old.to_dict() != cfg.to_dict():
                diff = first_difference(old.to_dict(), cfg.to_dict())
                raise LegokitError(f"run directory {self.path} belongs to a different config ({diff}); "
                                   "resume with the same config or choose another output directory")
            if resume and (self.path / "state.json").is_file():
                state = json.loads((self.path / "state.json").read_text())
                self.last_round = int(state["round"])
                self.metrics = [m for m in _read_jsonl(self.path / "metrics.jsonl") if m["round"] <= self.last_round]
                self.rounds = [m for m in _read_jsonl(self.path / "rounds.jsonl") if m["round"] <= self.last_round]
        self.path.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(cfg_file)

    def round_dir(self, rnd: int) -> Path:
        """Where the global state after round ``rnd`` lives."""
        return self.path / "adapters" / f"round_{rnd:03d}"

    def restore(self, state: State) -> int:
        """Load the last finished round's global state into ``state``; returns that round (0: none)."""
        if self.last_round:
            state.load(self.round_dir(self.last_round), self.last_round)
        return self.last_round

    def commit(self, rnd: int, state: State, client_lines: list[dict], round_line: dict) -> None:
        """Record a finished round: its global state (atomically), the metrics, then ``state.json``."""
        final = self.round_dir(rnd)
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        state.save(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self.metrics.extend(client_lines)
        self.rounds.append(round_line)
        _write_jsonl(self.path / "metrics.jsonl", self.metrics)
        _write_jsonl(self.path / "rounds.jsonl", self.rounds)
        atomic_write_json(self.path / "state.json", {"round": rnd, "time": time.time()})
        self.last_round = rnd


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
