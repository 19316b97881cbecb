"""The run directory as a checkpoint (tiny-llama): a complete run directory, resume after a crash with the same
numbers, guards against mixing runs."""

import json

import pytest
import torch
from helpers import PARTS, fresh_setup, global_delta, run_tiny, tiny_config

from legokit.aggregate import AGGREGATORS
from legokit.broadcast import load_uniform_adapter
from legokit.federation import run_federation
from legokit.utils import LegokitError


def test_two_rounds_write_a_complete_run_dir(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    server = run_tiny(tiny_config(), llm, tok, blocks, PARTS, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["client"]) for m in lines] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(m["status"] == "ok" and m["steps"] == 2 for m in lines)
    assert json.loads((tmp_path / "state.json").read_text())["round"] == 2
    factors, alpha = load_uniform_adapter(tmp_path / "adapters" / "round_002")
    for name, (a, b) in factors.items():
        torch.testing.assert_close(a, server.broadcast.factors[name][0])
        torch.testing.assert_close(b, server.broadcast.factors[name][1])
    # the global rank defaults to the sum of the client ranks
    assert next(iter(factors.values()))[0].shape[0] == 4
    # round 2's record, recomputed: HeteAgg of the clients' updates (weights = sample counts; the dense
    # client owns every coordinate, so "keep" never applies here), then its best rank-4 approximation
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    energy = rounds[1]["energy_kept"]
    assert rounds[1]["energy_kept_min"] == pytest.approx(min(energy.values()))
    assert rounds[1]["energy_kept_mean"] == pytest.approx(sum(energy.values()) / len(energy))
    prev_factors, prev_scaling = load_uniform_adapter(tmp_path / "adapters" / "round_001")
    results = server.last_results
    assert [r.client for r in results] == [0, 1] and [r.num_examples for r in results] == [4, 4]
    final = global_delta(server)
    for name in server.modules:
        a, b = prev_factors[name]
        want = AGGREGATORS["heteagg"](server.updates(results, [name]), {name: prev_scaling * (b @ a)}, "keep")[name]
        s2 = torch.linalg.svdvals(want.double()) ** 2
        assert energy[name] == pytest.approx(float(s2[:4].sum() / s2.sum()), rel=1e-4), name
        residual = float((final[name] - want).double().square().sum())
        assert residual == pytest.approx(float(s2[4:].sum()), rel=1e-3, abs=1e-10), name  # Eckart-Young


class _Crash(RuntimeError):
    pass


def _crash_after_first(rnd, _line):
    if rnd == 1:
        raise _Crash("simulated crash after round 1")


@pytest.mark.parametrize("broadcast", ["adapter", "merge"])
def test_resume_after_crash_ends_with_the_same_numbers(tmp_path, broadcast):
    cfg = tiny_config(fed={"broadcast": broadcast})
    llm, tok, blocks = fresh_setup()
    whole = run_tiny(cfg, llm, tok, blocks, PARTS, tmp_path / "whole")
    llm_whole = llm

    llm, tok, blocks = fresh_setup()
    with pytest.raises(_Crash):
        run_federation(cfg, llm, tok, blocks, PARTS, tmp_path / "crashed", progress=False,
                       on_round=_crash_after_first)
    llm, tok, blocks = fresh_setup()  # a new process: nothing survives but the run directory
    resumed = run_tiny(cfg, llm, tok, blocks, PARTS, tmp_path / "crashed", resume=True)
    if broadcast == "adapter":
        for name, delta in global_delta(whole).items():
            torch.testing.assert_close(global_delta(resumed)[name], delta, atol=1e-6, rtol=0)
    else:
        for name in whole.modules:
            torch.testing.assert_close(llm.get_submodule(name).weight, llm_whole.get_submodule(name).weight,
                                       atol=1e-6, rtol=0)
    m_whole = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    m_resumed = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss_last"] for x in m_whole] == pytest.approx(
        [json.loads(x)["loss_last"] for x in m_resumed], abs=1e-6)


def test_run_dir_guards(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    run_federation(tiny_config(fed={"rounds": 1}), llm, tok, blocks, PARTS, tmp_path, progress=False)
    with pytest.raises(LegokitError, match="already holds a run"):
        run_federation(tiny_config(fed={"rounds": 1}), llm, tok, blocks, PARTS, tmp_path, progress=False)
    with pytest.raises(LegokitError, match="different config.*fed.rounds"):
        run_federation(tiny_config(fed={"rounds": 3}), llm, tok, blocks, PARTS, tmp_path, resume=True, progress=False)
