"""Numbers that must not move: every condition's per-round training losses, pinned.

The round loop was redesigned (one loop for ``run_federation``, Flower and the tour); a redesign may move
code, never numbers. ``tests/data/pinned_tiny_losses.json`` holds the losses the loop produced before the
redesign (commit 42bf5d6) for five conditions on tiny-llama: HeteAgg with the adapter and the merge
broadcast, ``local``, ``centralized`` and FlexLoRA, 3 clients on blocks at 0 / 50 / 75%, 3 rounds of 3 steps.
The quick demo's own losses (default LLM) are pinned the same way in ``tests/data/quick_demo_losses.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from legokit.blocks import extract_blocks
from legokit.config import ExperimentConfig
from legokit.data import Example
from legokit.federation import run_federation
from legokit.models import load_model

DATA = Path(__file__).parent / "data"
CALIB = ["The quick brown fox jumps over the lazy dog. " * 4, "Paris is the capital of France. " * 4] * 2
# Float32 sums may round differently on another CPU's kernels; three rounds of Adam keep that far below this.
REL = 1e-4


def _examples(task: str, n: int) -> list[Example]:
    return [Example(task=task, prompt=f"{task} question {i}: what is {i} plus {i}?", response=str(2 * i),
                    uid=f"{task}-{i}") for i in range(n)]


@pytest.mark.parametrize("condition", ["heteagg-adapter", "heteagg-merge", "local-adapter", "centralized-adapter",
                                       "flexlora-adapter"])
def test_per_round_losses_of_every_condition_are_pinned(condition, tmp_path):
    aggregator, broadcast = condition.split("-")
    cfg = ExperimentConfig.from_dict({
        "model": "tiny-llama", "prune": {"sparsities": [0.0, 0.5, 0.75], "n_calib": 4, "seq_len": 32},
        "lora": {"rank": 2, "alpha": 4.0}, "train": {"local_steps": 3, "batch_size": 2, "max_len": 64, "lr": 0.01},
        "fed": {"num_clients": 3, "rounds": 3, "aggregator": aggregator, "broadcast": broadcast,
                "client_sparsities": [0.0, 0.5, 0.75]},
        "data": {"tasks": ["boolq", "asdiv"], "train_examples": 8}, "eval": {"base": False}})
    llm, tok = load_model("tiny-llama", device="cpu")
    blocks = extract_blocks(llm, tok, sparsities=(0.0, 0.5, 0.75), method="wanda", pattern="unstructured",
                            calibration="one_shot", n_calib=4, seq_len=32, seed=0, texts=CALIB)
    parts = [_examples("boolq", 4), _examples("asdiv", 4), _examples("boolq", 2) + _examples("asdiv", 2)]
    run_federation(cfg, llm, tok, blocks, parts, tmp_path, progress=False)
    got = [[m["round"], m["client"], m["losses"]] for m in map(json.loads, open(tmp_path / "metrics.jsonl"))]
    want = json.loads((DATA / "pinned_tiny_losses.json").read_text())["runs"][condition]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    for (rnd, client, losses), (_, _, pinned) in zip(got, want, strict=True):
        assert losses == pytest.approx(pinned, rel=REL), f"round {rnd}, client {client}"


@pytest.mark.slow
def test_quick_demo_per_round_losses_are_pinned(tmp_path):
    """``make demo``'s federation (configs/quick.yaml on the default LLM): every client's losses in both rounds
    equal those of the loop before the redesign (``legokit run --config configs/quick.yaml`` at 42bf5d6)."""
    from legokit.config import load_config
    from legokit.experiment import client_partitions, load_or_extract_blocks
    from legokit.utils import seed_everything

    cfg = load_config(Path(__file__).parents[1] / "configs" / "quick.yaml")
    seed_everything(cfg.seed)
    llm, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    parts = client_partitions(cfg)
    blocks = load_or_extract_blocks(cfg, llm, tok, tmp_path, progress=False)
    run_federation(cfg, llm, tok, blocks, parts, tmp_path, progress=False)
    got = [[m["round"], m["client"], m["losses"]] for m in map(json.loads, open(tmp_path / "metrics.jsonl"))]
    want = json.loads((DATA / "quick_demo_losses.json").read_text())["losses"]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    for (rnd, client, losses), (_, _, pinned) in zip(got, want, strict=True):
        assert losses == pytest.approx(pinned, rel=REL), f"round {rnd}, client {client}"
