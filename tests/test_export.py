"""``legokit export`` on tiny-llama: a run's final global LLM and its blocks as plain HF checkpoints.

Each fixture runs a 1-round tiny experiment into a run directory the way ``run_experiment`` lays it out
(blocks saved under ``blocks/`` with ``index.json``, then ``run_federation``); the export rebuilds the
state from that directory alone and must give the logits of the in-memory ``global_model`` /
``block_model`` of the run that wrote it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import CALIB, PARTS, tiny_config
from transformers import AutoModelForCausalLM

from legokit.blocks import extract_blocks
from legokit.cli import main
from legokit.config import ExperimentConfig
from legokit.federation import block_model, global_model, run_federation
from legokit.lmeval import export_checkpoint
from legokit.models import load_model
from legokit.utils import LegokitError, atomic_write_json

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61], [120, 8, 8, 33, 200, 11, 90, 4]])


def _cfg(pattern: str = "unstructured", **fed) -> ExperimentConfig:
    return tiny_config(prune={"pattern": pattern}, fed={"rounds": 1, **fed})


def _tiny_run(run_dir, cfg: ExperimentConfig):
    """A finished 1-round run in ``run_dir`` (no assets needed); returns its in-memory strategy and LLM."""
    llm, tok = load_model(cfg.model)
    p = cfg.prune
    blocks = extract_blocks(llm, tok, sparsities=tuple(p.sparsities), method=p.method, pattern=p.pattern,
                            n_calib=p.n_calib, seq_len=p.seq_len, seed=cfg.seed, texts=CALIB, progress=False)
    for i, b in enumerate(blocks):  # as experiment.load_or_extract_blocks writes them
        b.save(run_dir / "blocks" / f"{i}")
    atomic_write_json(run_dir / "blocks" / "index.json", {"blocks": [b.id for b in blocks]})
    return run_federation(cfg, llm, tok, blocks, PARTS, run_dir, progress=False).strategy, llm


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(IDS).logits.detach().clone()


def _reload(out) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    return _logits(model)


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("adapter_run")
    return (run, *_tiny_run(run, _cfg()))


@pytest.fixture(scope="module")
def merge_structured_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("merge_run")
    return (run, *_tiny_run(run, _cfg("structured", broadcast="merge")))


def test_global_and_unstructured_block_reload_with_the_run_logits(adapter_run, tmp_path):
    run, server, llm = adapter_run
    export_checkpoint(run, tmp_path / "global")
    export_checkpoint(run, tmp_path / "block", model="wanda-unstructured-50")
    with global_model(server, llm) as m:
        ref_global = _logits(m)
    with block_model(server, 1) as m:
        ref_block = _logits(m)
    got_global, got_block = _reload(tmp_path / "global"), _reload(tmp_path / "block")
    torch.testing.assert_close(got_global, ref_global, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_block, ref_block, rtol=0, atol=1e-5)
    # the update is really in there: neither equals the untrained LLM, and the block is not the global model
    base, _ = load_model("tiny-llama")
    assert (got_global - _logits(base)).abs().max() > 1e-4
    assert (got_block - got_global).abs().max() > 1e-4
    # the block keeps its sparsity after the merge (M ⊙ ΔW)
    w = AutoModelForCausalLM.from_pretrained(tmp_path / "block").model.layers[0].mlp.up_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.01
    info = json.loads((tmp_path / "block" / "legokit_export.json").read_text())
    assert info["round"] == 1 and info["block"]["id"] == "wanda-unstructured-50"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "block").iterdir()}


def test_merge_mode_structured_block_is_written_at_its_own_smaller_shape(merge_structured_run, tmp_path):
    run, server, llm = merge_structured_run
    export_checkpoint(run, tmp_path / "global")
    export_checkpoint(run, tmp_path / "block", model="1")  # by index
    with global_model(server, llm) as m:
        torch.testing.assert_close(_reload(tmp_path / "global"), _logits(m), rtol=0, atol=1e-5)
    with block_model(server, 1) as m:
        ref = _logits(m)
    torch.testing.assert_close(_reload(tmp_path / "block"), ref, rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "block" / "config.json").read_text())
    sizes = server.blocks[1].sizes
    assert config["intermediate_size"] == sizes.channels < 128 and config["num_attention_heads"] == sizes.heads


def test_checkpoint_loads_without_legokit(adapter_run, tmp_path):
    run, server, llm = adapter_run
    export_checkpoint(run, tmp_path / "ckpt")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"d = {str(tmp_path / 'ckpt')!r}\n"
            "m = AutoModelForCausalLM.from_pretrained(d).eval(); tok = AutoTokenizer.from_pretrained(d)\n"
            f"ids = torch.tensor({IDS.tolist()})\n"
            "with torch.no_grad(): torch.save(m(ids).logits, d + '/logits.pt')\n"
            "assert not any(k.startswith('legokit') for k in sys.modules)\n"
            "print(tok.decode(tok('Paris')['input_ids']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("Paris")
    with global_model(server, llm) as m:
        ref = _logits(m)
    got = torch.load(tmp_path / "ckpt" / "logits.pt", weights_only=True)  # a plain tensor written just above
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_local_run_needs_a_client(tmp_path):
    run = tmp_path / "run"
    server, llm = _tiny_run(run, _cfg(aggregator="local"))
    with pytest.raises(LegokitError, match="--client K"):
        export_checkpoint(run, tmp_path / "x")
    with pytest.raises(LegokitError, match="holds block"):
        export_checkpoint(run, tmp_path / "x", model=server.blocks[0].id, client=1)
    export_checkpoint(run, tmp_path / "c1", client=1)
    with block_model(server, server.assignment[1], 1) as m:
        ref = _logits(m)
    torch.testing.assert_close(_reload(tmp_path / "c1"), ref, rtol=0, atol=1e-5)


def test_errors_name_the_fix(adapter_run, tmp_path):
    run, _, _ = adapter_run
    with pytest.raises(LegokitError, match="not a run directory"):
        export_checkpoint(tmp_path, tmp_path / "x")
    with pytest.raises(LegokitError, match=r"unknown block 'nope'.*0: wanda-unstructured-0, 1: wanda-unstructured-50"):
        export_checkpoint(run, tmp_path / "x", model="nope")
    with pytest.raises(LegokitError, match="drop --client"):
        export_checkpoint(run, tmp_path / "x", client=0)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _cfg().to_yaml(fresh / "config.yaml")  # a run that never finished a round
    with pytest.raises(LegokitError, match="no finished round"):
        export_checkpoint(fresh, tmp_path / "x")


def test_cli_export(adapter_run, tmp_path, capsys):
    run, _, _ = adapter_run
    assert main(["export", str(run), "--model", "wanda-unstructured-0", "--out", str(tmp_path / "b0")]) == 0
    assert "wanda-unstructured-0" in capsys.readouterr().out
    assert (tmp_path / "b0" / "model.safetensors").is_file()
    assert main(["export", str(run), "--model", "9", "--out", str(tmp_path / "x")]) == 2
    assert "unknown block '9'" in capsys.readouterr().err
