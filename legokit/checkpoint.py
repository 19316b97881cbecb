"""A run directory as a checkpoint: every finished round is written atomically, and a run resumes after it.

Layout: ``config.yaml`` (the config the directory is bound to, written before anything else); ``blocks/``
(``index.json`` names the blocks and what they were made with); ``adapters/round_NNN/`` (the global state after
round N, written by the strategy's broadcast: a peft adapter, per-client adapters, or the merged weights and
blocks); ``metrics.jsonl`` (a line per client and round); ``rounds.jsonl`` (a line per round); ``state.json``
(the last finished round: the commit point, written last). A crash between two commits leaves the previous
round's state, which ``Checkpoint`` resumes from; a ``.partial`` folder of the crashed round is discarded.

Opening a ``Checkpoint`` is the run's first step, before the model loads: it refuses a directory that holds
another run, and checks every file a resume will read (JSON parsed, safetensors headers against file sizes),
so a damaged directory is an error naming the file and the round to resume from instead, not a traceback
after minutes of work.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Protocol

from legokit.config import ExperimentConfig, first_difference
from legokit.names import aggregator_has_global
from legokit.utils import LegokitError, atomic_write_json, atomic_write_text


class State(Protocol):
    """What a checkpoint saves: the global state of a round (``LegoStrategy``)."""

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path, rnd: int) -> None: ...


class Checkpoint:
    """The run directory of one experiment: its config, finished rounds and their records.

    Opened before the model loads: the directory is bound to ``cfg`` (``config.yaml`` written first), and a
    resume checks every file it will read.

    Args:
        path: the run directory (created).
        cfg: the experiment; a directory that holds another config's run, or its blocks, is refused.
        resume: continue the run the directory holds (a fresh start when it holds none); else it must hold no
            run.
        resume_round: continue from this finished round instead of the last one (implies ``resume``; the
            rounds after it run again): the way past a damaged last round.
    Raises:
        LegokitError: the directory holds a run and ``resume`` is off, holds another config's run or blocks,
            or a file a resume would read is damaged (the message names it and the round to resume from).
    """

    def __init__(self, path: str | Path, cfg: ExperimentConfig, resume: bool, *, resume_round: int | None = None):
        self.path = Path(path)
        self.cfg = cfg
        cfg_file = self.path / "config.yaml"
        self.last_round = 0
        self.metrics: list[dict] = []
        self.rounds: list[dict] = []
        resume = resume or resume_round is not None
        held = [n for n in ("state.json", "results.json") if (self.path / n).is_file()]
        if held and not resume:
            raise LegokitError(f"run directory {self.path} already holds a run ({held[0]}): pass resume=True "
                               "(--resume) to continue it, or choose another output directory")
        if resume and cfg_file.is_file():
            old = _read_config(cfg_file).to_dict()
            if old != cfg.to_dict():
                diff = first_difference(old, cfg.to_dict())
                raise LegokitError(f"run directory {self.path} belongs to a different config ({diff}); "
                                   "resume with the same config or choose another output directory")
            self.last_round, self.metrics, self.rounds = _resume_point(self.path, cfg, resume_round)
        elif held:
            raise LegokitError(f"run directory {self.path} holds a run ({held[0]}) but no config.yaml, so it "
                               "cannot be resumed: start over in another output directory")
        elif resume_round:
            raise LegokitError(f"resume_round={resume_round}: run directory {self.path} holds no run (no "
                               "config.yaml); start without it, or point at the directory of the run to continue")
        check_blocks(self.path / "blocks", cfg)
        # bound before anything else is written: a later run compares its config with this file
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


# ----- blocks -------------------------------------------------------------------------------------------
def blocks_made_with(cfg: ExperimentConfig) -> dict:
    """What a run's blocks depend on (the LLM, the seed, the pruning settings), as ``blocks/index.json``
    records it."""
    return json.loads(json.dumps({"model": cfg.model, "seed": cfg.seed, "prune": cfg.to_dict()["prune"]}))


def check_blocks(directory: str | Path, cfg: ExperimentConfig) -> bool:
    """Check the saved blocks in ``directory`` before a run loads them: made with ``cfg``'s LLM, seed and
    pruning settings, every file intact. Returns False when there are none (``index.json`` is written last).

    Raises:
        LegokitError: blocks of another config, or a damaged file (named); the fix: delete ``directory``
            (the blocks are extracted again) or choose another output directory.
    """
    bdir = Path(directory)
    index = bdir / "index.json"
    if not index.is_file():
        return False
    fix = f"delete {bdir} (the blocks are extracted again) or choose another output directory"
    want = blocks_made_with(cfg)
    try:
        info = _read_json(index)
        ids = info.get("blocks")
        if not (isinstance(ids, list) and ids):
            raise _Damaged(index, "names no blocks")
        made = info.get("made_with")
        if made is not None and made != want:
            raise LegokitError(f"{bdir} holds blocks of another config ({first_difference(made, want)}): they "
                               f"are not this run's blocks; {fix}")
        for i in range(len(ids)):
            block = _check_block(bdir / f"{i}")
            # an index written before it recorded ``made_with``: what each block.json says must match
            got = {"method": block.get("method"), "pattern": block.get("pattern")}
            if made is None and got != {"method": cfg.prune.method, "pattern": cfg.prune.pattern}:
                raise LegokitError(f"{bdir / str(i)} holds a {got['method']} {got['pattern']} block, not this "
                                   f"config's prune.method={cfg.prune.method!r} prune.pattern="
                                   f"{cfg.prune.pattern!r}: {fix}")
    except _Damaged as err:
        raise LegokitError(f"the saved blocks cannot be loaded: {err}; {fix}") from None
    return True


# ----- checking a run directory before resuming it ---------------------------------------------------------
class _Damaged(Exception):
    """A file of the run directory that cannot be what the run wrote (turned into a ``LegokitError``)."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path} {problem}")


def _read_config(path: Path) -> ExperimentConfig:
    try:
        return ExperimentConfig.from_yaml(path)
    except (ValueError, TypeError) as err:  # LegokitError is a ValueError
        raise LegokitError(f"{path} cannot be read ({err}): the run directory's config is damaged, so the run "
                           "cannot be resumed; start over in another output directory") from None


def _resume_point(path: Path, cfg: ExperimentConfig, resume_round: int | None) -> tuple[int, list, list]:
    """The round to resume after and the metrics and round lines up to it, every file it needs checked."""
    total = cfg.fed.rounds
    recorded, problem = _state_round(path)
    if resume_round is not None:
        if not 0 <= resume_round <= total:
            raise LegokitError(f"resume_round={resume_round} is not a round of this run: use 0..{total} (fed.rounds)")
        if recorded is not None and resume_round > recorded:
            raise LegokitError(f"resume_round={resume_round}: the run in {path} finished round {recorded} last "
                               f"(state.json); resume from round {recorded} or an earlier one")
        target = resume_round  # state.json is not needed: the round's own files are checked below
    elif problem is not None:
        raise _cannot_resume(path, cfg, problem, below=total + 1)
    elif recorded is None:
        return 0, [], []  # no round finished yet (a crash during extraction or round 1)
    elif recorded > total:
        raise _cannot_resume(path, cfg, f"{path / 'state.json'} says round {recorded} finished, past this "
                             f"config's fed.rounds={total}", below=total + 1)
    else:
        target = recorded
    if target == 0:
        return 0, [], []
    try:
        metrics, rounds = _check_round(path, cfg, target)
    except _Damaged as err:
        raise _cannot_resume(path, cfg, str(err), below=target) from None
    return target, metrics, rounds


def _state_round(path: Path) -> tuple[int | None, str | None]:
    """The last finished round ``state.json`` records (None: no file), or what is wrong with the file."""
    f = path / "state.json"
    if not f.is_file():
        return None, None
    try:
        rnd = json.loads(f.read_bytes())["round"]
    except (ValueError, KeyError, TypeError) as err:
        return None, f"{f} is damaged ({type(err).__name__}: {err})"
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        return None, f"{f} is damaged (round {rnd!r} is not a round number)"
    return rnd, None


def _cannot_resume(path: Path, cfg: ExperimentConfig, problem: str, below: int) -> LegokitError:
    """The error for a damaged resume point: the problem, and the latest intact round before ``below``."""
    r = _latest_intact(path, cfg, below)
    if r:
        fix = f"resume from round {r} instead (--resume-round {r}; the rounds after it run again)"
    else:
        fix = "resume from round 0 (--resume-round 0: every round runs again on the saved blocks)"
    return LegokitError(f"run directory {path} cannot be resumed: {problem}. Fix: {fix}, or start over in "
                        "another output directory")


def _latest_intact(path: Path, cfg: ExperimentConfig, below: int) -> int:
    for r in range(min(below - 1, cfg.fed.rounds), 0, -1):
        try:
            _check_round(path, cfg, r)
            return r
        except _Damaged:
            continue
    return 0


def _check_round(path: Path, cfg: ExperimentConfig, rnd: int) -> tuple[list[dict], list[dict]]:
    """Check the files a resume after round ``rnd`` reads (the global state the broadcast wrote, in the layout
    of ``cfg``'s condition, and the record lines); returns the metrics and round lines up to ``rnd``."""
    d = path / "adapters" / f"round_{rnd:03d}"
    if not d.is_dir():
        raise _Damaged(d, f"is missing (the global state after round {rnd})")
    if not aggregator_has_global(cfg.fed.aggregator):  # broadcast.LocalAdapters: one adapter per client that trained
        for sub in sorted(d.glob("client_*")):
            _check_adapter(sub)
    elif cfg.fed.broadcast == "merge":  # broadcast.MergeBroadcast: merged weights and every block
        _check_safetensors(d / "merged_linear.safetensors")
        subs = sorted(p for p in (d / "blocks").glob("*") if p.is_dir())
        if not subs:
            raise _Damaged(d / "blocks", "is missing (the merged blocks)")
        for sub in subs:
            _check_block(sub)
    else:  # broadcast.AdapterBroadcast: the global adapter
        _check_adapter(d)
    metrics = _lines_upto(path / "metrics.jsonl", rnd)
    missing = sorted(set(range(1, rnd + 1)) - {m["round"] for m in metrics})
    if missing:
        raise _Damaged(path / "metrics.jsonl", f"has no line of round {missing[0]}")
    rounds = _lines_upto(path / "rounds.jsonl", rnd)
    if [r["round"] for r in rounds] != list(range(1, rnd + 1)):
        raise _Damaged(path / "rounds.jsonl", f"does not hold one line for each of rounds 1..{rnd}")
    return metrics, rounds


def _lines_upto(path: Path, rnd: int) -> list[dict]:
    """The records of rounds up to ``rnd`` (the files are in round order: later lines are not read)."""
    if not path.is_file():
        raise _Damaged(path, "is missing")
    rows = []
    for i, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            r = row["round"]
        except (ValueError, KeyError, TypeError):
            raise _Damaged(path, f"line {i} is damaged (not a JSON record with a round)") from None
        if not isinstance(r, int):
            raise _Damaged(path, f"line {i} is damaged (round {r!r})")
        if r > rnd:
            break
        rows.append(row)
    return rows


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise _Damaged(path, "is missing")
    try:
        out = json.loads(path.read_bytes())
    except ValueError as err:
        raise _Damaged(path, f"is damaged (not JSON: {err})") from None
    if not isinstance(out, dict):
        raise _Damaged(path, f"is damaged (a JSON {type(out).__name__}, not an object)")
    return out


def _check_adapter(d: Path) -> None:
    """A peft adapter as ``adapters.save_peft_adapter`` writes it: a LoRA config and intact tensors."""
    config = _read_json(d / "adapter_config.json")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if (config.get("peft_type") != "LORA" or isinstance(r, bool) or not isinstance(r, int) or r < 1
            or isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        raise _Damaged(d / "adapter_config.json", f"is damaged (peft_type {config.get('peft_type')!r}, r {r!r}, "
                       f"lora_alpha {alpha!r}: not a LoRA adapter's)")
    _check_safetensors(d / "adapter_model.safetensors")


def _check_block(d: Path) -> dict:
    """A block as ``Block.save`` writes it: ``block.json`` and intact tensor files; returns ``block.json``."""
    info = _read_json(d / "block.json")
    if not all(k in info for k in ("format_version", "sparsity", "method", "pattern", "shapes")):
        raise _Damaged(d / "block.json", "is damaged (not a block's description)")
    for f in sorted(d.glob("*.safetensors")):
        _check_safetensors(f)
    if info.get("overrides"):
        _check_safetensors(d / "overrides.safetensors")
    if float(info["sparsity"]) > 0 and not any((d / n).is_file() for n in ("masks.safetensors", "index.safetensors")):
        raise _Damaged(d / "masks.safetensors", "is missing (a sparse block's masks)")
    return info


def _check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose size is what the header says (a truncated file is not)."""
    if not path.is_file():
        raise _Damaged(path, "is missing")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")  # the format: u64 header length, JSON header, data
            if size < 8 or 8 + n > size:
                raise _Damaged(path, f"is truncated ({size} bytes)")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise _Damaged(path, "is damaged (its safetensors header does not parse)") from None
    if 8 + n + end != size:
        raise _Damaged(path, f"is truncated or damaged ({size} bytes; its header describes {8 + n + end})")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
