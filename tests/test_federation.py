"""The one round loop on tiny-llama: failures recorded while the round goes on, stepping equals running, a
structured block's client, updates that do not fit."""

import json

import pytest
import torch
from helpers import CALIB, PARTS, global_delta, random_results, run_tiny, tiny_config

from legokit.blocks import extract_blocks
from legokit.broadcast import load_uniform_adapter
from legokit.federation import build_federation, run_federation
from legokit.utils import LegokitError


def test_failed_client_is_recorded_and_round_goes_on(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    server = run_tiny(tiny_config(), llm, tok, blocks, PARTS, tmp_path, inject_failures={1: [1], 2: [0, 1]})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    status = {(m["round"], m["client"]): m["status"] for m in lines}
    assert status == {(1, 0): "ok", (1, 1): "failed", (2, 0): "failed", (2, 1): "failed"}
    assert "injected failure of client 1 in round 1" in lines[1]["error"]
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["clients"] == 1 and rounds[1]["clients"] == 0
    # round 2 had no survivors: the global state of round 1 stands
    r1, _ = load_uniform_adapter(tmp_path / "adapters" / "round_001")
    for name, (a, b) in r1.items():
        torch.testing.assert_close(server.broadcast.factors[name][0], a)
        torch.testing.assert_close(server.broadcast.factors[name][1], b)


def test_empty_client_is_refused_before_work(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    with pytest.raises(LegokitError, match="client 1 has no training data"):
        run_federation(tiny_config(), llm, tok, blocks, [PARTS[0], []], tmp_path, progress=False)
    assert not (tmp_path / "config.yaml").exists()


def test_a_structured_block_client_trains_in_the_loop_and_its_update_stays_in_its_rows(tiny_fresh, tmp_path):
    llm, tok = tiny_fresh
    blocks = extract_blocks(llm, tok, sparsities=(0.0, 0.5), method="wanda", pattern="structured",
                            calibration="one_shot", n_calib=4, seq_len=32, seed=0, texts=CALIB)
    strategy = run_tiny(tiny_config(fed={"rounds": 1}), llm, tok, blocks, PARTS, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["status"] for m in lines] == ["ok", "ok"] and lines[1]["block"] == "wanda-structured-50"
    structured = blocks[1]
    (_, res1) = strategy.last_results
    pruned = 0
    for name, (a, b) in res1.factors.items():  # sent back in LLM coordinates, zero outside the kept rows/cols
        mask = structured.masks[name]
        delta = b @ a
        assert delta.shape == mask.shape
        assert float(delta.masked_fill(mask, 0).abs().sum()) == 0.0, name
        assert float(delta[mask].abs().max()) > 0.0, name
        pruned += int((~mask).sum())
    assert pruned > 0  # the block does drop rows / columns


def test_stepping_the_loop_round_by_round_equals_running_it(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    whole = run_tiny(tiny_config(), llm, tok, blocks, PARTS, tmp_path / "run")
    fed = build_federation(tiny_config(), llm, tok, blocks, PARTS, tmp_path / "step", progress=False)
    first = fed.step()
    assert (first.round, fed.round, [r.client for r in first.results]) == (1, 1, [0, 1])
    assert [ln["round"] for ln in first.lines] == [1, 1] and "energy_kept_mean" in first.metrics
    fed.step()
    assert fed.done
    with pytest.raises(LegokitError, match="all 2 rounds are done"):
        fed.step()
    for name, delta in global_delta(whole).items():
        torch.testing.assert_close(global_delta(fed.strategy)[name], delta, atol=0, rtol=0)


def test_an_update_that_does_not_fit_the_llm_is_recorded_as_failed(setup_llm, tmp_path):
    from legokit.federation import Exchange, Outcome

    llm, tok, blocks = setup_llm
    fed = build_federation(tiny_config(fed={"rounds": 1}), llm, tok, blocks, PARTS, tmp_path, progress=False)
    tasks = fed.strategy.configure(1)
    good, bad = random_results(llm, (4, 4))
    name = next(iter(bad.factors))
    bad.factors[name] = (bad.factors[name][0][:, :3], bad.factors[name][1])  # A cut to 3 input columns
    done = fed.finish(1, Exchange([Outcome(tasks[0], good), Outcome(tasks[1], bad)]), started=0.0)
    assert [ln["status"] for ln in done.lines] == ["ok", "failed"]
    assert f"client 1: factors for {name} have shapes A (2, 3)" in done.lines[1]["error"]
    assert done.metrics["clients"] == 1 and done.metrics["failed"] == [1]
