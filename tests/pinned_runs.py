"""The federations whose per-round losses are pinned (``tests/test_pinned.py``), as functions.

``bench/pin_spread.py`` runs the same functions under other float32 kernels to measure how far they move the
losses; the tests run them on this machine's kernels. ``overrides`` are config keys (``"fed.aggregator"``, ...)
set on top of the pinned config: a real change of algorithm, used to show the pin catches one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from helpers import CALIB, make_examples

from legokit.blocks import extract_blocks
from legokit.config import ExperimentConfig, load_config
from legokit.federation import run_federation
from legokit.models import load_model

DATA = Path(__file__).parent / "data"
TINY_CONDITIONS = ["heteagg-adapter", "heteagg-merge", "local-adapter", "centralized-adapter", "flexlora-adapter"]

Losses = list[list]  # [[round, client, [loss per local step]], ...] in metrics.jsonl order


def _read_losses(run_dir: Path) -> Losses:
    return [[m["round"], m["client"], m["losses"]] for m in map(json.loads, open(run_dir / "metrics.jsonl"))]


def tiny_losses(condition: str, run_dir: Path, overrides: dict | None = None) -> Losses:
    """One pinned tiny-llama federation (3 clients on Wanda blocks at 0 / 50 / 75%, 3 rounds of 3 steps)."""
    aggregator, broadcast = condition.split("-")
    cfg = ExperimentConfig.from_dict({
        "model": "tiny-llama", "prune": {"sparsities": [0.0, 0.5, 0.75], "n_calib": 4, "seq_len": 32},
        "lora": {"rank": 2, "alpha": 4.0}, "train": {"local_steps": 3, "batch_size": 2, "max_len": 64, "lr": 0.01},
        "fed": {"num_clients": 3, "rounds": 3, "aggregator": aggregator, "broadcast": broadcast,
                "client_sparsities": [0.0, 0.5, 0.75]},
        "data": {"tasks": ["boolq", "asdiv"], "train_examples": 8}, "eval": {"base": False}})
    if overrides:
        cfg = cfg.with_overrides(overrides)
    llm, tok = load_model("tiny-llama", device="cpu")
    blocks = extract_blocks(llm, tok, sparsities=(0.0, 0.5, 0.75), method="wanda", pattern="unstructured",
                            calibration="one_shot", n_calib=4, seq_len=32, seed=0, texts=CALIB)
    parts = [make_examples("boolq", 4), make_examples("asdiv", 4),
             make_examples("boolq", 2) + make_examples("asdiv", 2)]
    run_federation(cfg, llm, tok, blocks, parts, run_dir, progress=False)
    return _read_losses(run_dir)


def quick_losses(run_dir: Path, overrides: dict | None = None) -> Losses:
    """The quick demo's federation as pinned (``tests/data/quick_pin.yaml``, configs/quick.yaml as it was then) on
    the default LLM (extraction and both rounds)."""
    from legokit.experiment import client_partitions, load_or_extract_blocks
    from legokit.utils import seed_everything

    cfg = load_config(DATA / "quick_pin.yaml")
    if overrides:
        cfg = cfg.with_overrides(overrides)
    seed_everything(cfg.seed)
    llm, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    parts = client_partitions(cfg)
    blocks = load_or_extract_blocks(cfg, llm, tok, run_dir, progress=False)
    run_federation(cfg, llm, tok, blocks, parts, run_dir, progress=False)
    return _read_losses(run_dir)


def pinned(which: str) -> Losses:
    """The pinned losses of ``which``: a tiny condition (``"heteagg-adapter"``, ...) or ``"quick"``."""
    if which == "quick":
        return json.loads((DATA / "quick_demo_losses.json").read_text())["losses"]
    return json.loads((DATA / "pinned_tiny_losses.json").read_text())["runs"][which]


def max_rel_deviation(got: Losses, want: Losses) -> float:
    """The largest |got - want| / |want| over every loss; refuses runs of another shape (rounds, clients, steps)."""
    assert [g[:2] for g in got] == [w[:2] for w in want], "the runs differ in rounds or clients"
    worst = 0.0
    for (_, _, a), (_, _, b) in zip(got, want, strict=True):
        assert len(a) == len(b), "the runs differ in local steps"
        worst = max([worst] + [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)])
    return worst


def run(which: str, overrides: dict | None = None) -> Losses:
    """Run ``which`` in a throwaway directory and return its losses."""
    with tempfile.TemporaryDirectory() as tmp:
        return quick_losses(Path(tmp), overrides) if which == "quick" else tiny_losses(which, Path(tmp), overrides)
