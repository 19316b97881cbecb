"""The hardware planner (``legokit.plan``, ``legokit plan``): its numbers are the extracted blocks' numbers, without
building the model; presets have the known models' sizes; bad input is refused before any work."""

from __future__ import annotations

import json
import re

import pytest
import torch

from legokit.analysis import block_costs
from legokit.analysis.clients import measured_shape
from legokit.blocks import extract_blocks
from legokit.cli import main
from legokit.config import LoraConfig
from legokit.lora import attach_lora
from legokit.models import linear_modules, model_skeleton, param_bytes
from legokit.plan import block_cost, block_shapes, model_shape, parse_size, plan
from legokit.utils import LegokitError

PATTERNS = {"unstructured": (0.0, 0.25, 0.5, 0.75), "2:4": (0.0, 0.5), "structured": (0.0, 0.25, 0.5, 0.75)}


@pytest.fixture(scope="module")
def cut(tiny):
    """Magnitude blocks of tiny-llama in every pattern (no calibration: milliseconds)."""
    llm, tok = tiny
    return {p: extract_blocks(llm, tok, sparsities=s, method="magnitude", pattern=p) for p, s in PATTERNS.items()}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_the_planner_prices_each_block_as_the_extracted_block_measures(tiny, cut, pattern):
    llm, _ = tiny
    shape = model_shape("tiny-llama")  # from the name: planned, not measured on this llm
    assert shape.numel * 4 == param_bytes(llm)
    assert shape.linear == sum(m.weight.numel() for m in linear_modules(llm).values())
    planned = block_shapes(shape, pattern, PATTERNS[pattern])
    for block, plan_b in zip(cut[pattern], planned, strict=True):
        measured = measured_shape(llm, block)
        assert plan_b == measured, block.id  # kept weights, mask bytes, SLM shapes, heads
        cost = block_cost(shape, plan_b, rank=4, context=16)
        costs = block_costs(llm, block, context=16)  # the notebook's numbers, from the block
        assert cost["sparse_weights"] + cost["masks"] == pytest.approx(costs["sparse_mb"] * 2**20, abs=1e-6)
        assert cost["gflops_per_token"] == pytest.approx(costs["gflops_per_token"], rel=1e-12)
        if block.sparsity > 0:
            assert cost["masks"] == block.nbytes() or block.structured  # the packed bits the block holds
        # the weights as legokit runs the block: a copy is dense-shaped, a structured SLM smaller
        block.view = False
        model = block.model
        assert param_bytes(model) == cost["weights"], block.id
        lora = attach_lora(model, LoraConfig(rank=4), block.local_masks)
        factors = [m.lora_A.weight for m in lora.values()] + [m.lora_B.weight for m in lora.values()]
        assert sum(p.numel() * 4 for p in factors) == cost["lora"]
        for f in factors:  # what a backward pass leaves (the values do not matter to the bytes)
            f.grad = torch.zeros_like(f)
        opt = torch.optim.AdamW(factors, lr=1e-3)
        opt.step()
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
        assert state + sum(p.grad.numel() * 4 for p in factors) == cost["train_state"]
        block.release()
        block.view = True


def test_structured_blocks_shrink_and_views_do_not(tiny):
    blocks, _ = plan(model_shape("tiny-llama"), ["1MiB"], patterns=["unstructured", "structured"])
    dense = blocks.loc[blocks["block"] == "dense", "weights"].item()
    assert (blocks.loc[blocks["pattern"] == "unstructured", "weights"] == dense).all()
    assert blocks.loc[blocks["pattern"] == "structured", "weights"].is_monotonic_decreasing
    assert (blocks.loc[blocks["pattern"] == "structured", "weights"] < dense).all()
    assert blocks["block"].tolist().count("dense") == 1


def test_presets_have_the_known_models_sizes_without_building_them():
    one, seven = model_shape("llama-1b"), model_shape("llama-7b")
    assert one.params == 1_100_048_384 and round(one.params / 1e9, 2) == 1.10  # TinyLlama-1.1B
    assert seven.params == 6_738_415_616 and round(seven.params / 1e9, 2) == 6.74  # Llama-2-7B
    assert all(p.is_meta for p in model_skeleton("llama-7b").parameters())  # no weight memory
    blocks, clients = plan(seven, ["8GiB", "32GiB"])
    assert clients["block"].tolist() == [None, "structured-75", "dense"]  # 8 GiB: only a smaller model fits
    assert clients["pattern"].tolist() == ["unstructured", "structured", "dense"]


def test_budgets_parse_in_binary_and_decimal_units():
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("100") == 100 and parse_size(" 3 kib ") == 3072
    for bad in ("2gigs", "-1GiB", "0GiB", "GiB", ""):
        with pytest.raises(LegokitError, match="not a size"):
            parse_size(bad)


def test_the_cli_prints_the_table_and_json(capsys):
    assert main(["plan", "--model", "llama-7b", "--budgets", "8GiB,32GiB", "--pattern",
                 "unstructured,2:4,structured"]) == 0
    out = capsys.readouterr().out
    assert "llama-7b: 6.74B parameters" in out and "structured-75" in out and "none fits" in out
    assert "none fits: the smallest block, structured-75, needs 7.17 GiB" in out
    assert main(["plan", "--model", "tiny-llama", "--budgets", "1MiB", "--json", "--rank", "4", "--seq-len", "16"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "tiny-llama" and data["settings"]["rank"] == 4
    assert [c["block"] for c in data["clients"]] == ["dense"]
    dense = data["blocks"][0]
    assert dense["total"] == dense["weights"] + dense["lora"] + dense["train_state"]


@pytest.mark.parametrize("args, message", [
    (["--budgets", "2gigs"], "budget '2gigs' is not a size"),
    (["--model", "llama-13x", "--budgets", "1GiB"], "unknown model 'llama-13x'.*llama-1b, llama-7b"),
    (["--model", "llama-7b", "--budgets", "512MiB,1GiB"], "no budget .* the smallest, structured-75, needs 7.17 GiB"),
    (["--model", "llama-1b", "--budgets", "1GiB", "--pattern", "3:2"], "pattern '3:2' is invalid"),
    (["--model", "llama-1b", "--budgets", "1GiB", "--sparsities", "0,x"], "--sparsities '0,x'"),
    (["--model", "llama-1b", "--budgets", "1GiB", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["--model", "llama-1b", "--budgets", "1GiB", "--rank", "0"], "rank=0"),
])
def test_the_cli_refuses_bad_input(capsys, args, message):
    assert main(["plan", *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_config_json_plans_like_its_preset(tmp_path):
    from legokit.models import model_config

    path = tmp_path / "config.json"
    path.write_text(model_config("llama-1b").to_json_string())
    assert model_shape(str(path)).params == model_shape("llama-1b").params
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(LegokitError, match="not a Hugging Face model config"):
        model_shape(str(tmp_path / "bad.json"))


def test_a_preset_is_refused_as_a_model_to_run_before_any_work():
    from legokit.config import load_config
    from legokit.models import load_model, preflight

    cfg = load_config("configs/quick.yaml", overrides=["model=llama-1b"])
    for call in (lambda: preflight(cfg), lambda: load_model("llama-1b")):
        with pytest.raises(LegokitError, match="'llama-1b' is a shape preset for planning .*legokit plan"):
            call()
