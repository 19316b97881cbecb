"""The round loop on tiny-llama: checkpoints, resume equality, failures, modes, peft output."""

import json

import pytest
import torch

from legokit.blocks import extract_blocks
from legokit.config import ExperimentConfig
from legokit.data import Example
from legokit.federation import Server, assign_blocks, load_uniform_adapter, run_federation
from legokit.models import load_model
from legokit.utils import LegokitError

CALIB = ["The quick brown fox jumps over the lazy dog. " * 4, "Paris is the capital of France. " * 4] * 2


def _examples(task: str, n: int) -> list[Example]:
    return [Example(task=task, prompt=f"{task} question {i}: what is {i} plus {i}?", response=str(2 * i),
                    uid=f"{task}-{i}") for i in range(n)]


def _cfg(**fed) -> ExperimentConfig:
    base = {
        "model": "tiny-llama",
        "prune": {"sparsities": [0.0, 0.5], "n_calib": 4, "seq_len": 32},
        "lora": {"rank": 2, "alpha": 4.0},
        "train": {"local_steps": 2, "batch_size": 2, "max_len": 64, "lr": 0.01},
        "fed": {"num_clients": 2, "rounds": 2, **fed},
        "data": {"tasks": ["boolq", "asdiv"], "train_examples": 8},
        "eval": {"base": False},
    }
    return ExperimentConfig.from_dict(base)


@pytest.fixture(scope="module")
def setup_llm():
    llm, tok = load_model("tiny-llama")
    blocks = extract_blocks(llm, tok, sparsities=(0.0, 0.5), method="wanda", pattern="unstructured",
                            calibration="one_shot", n_calib=4, seq_len=32, seed=0, texts=CALIB)
    return llm, tok, blocks


PARTS = [_examples("boolq", 4), _examples("asdiv", 4)]


def _final(server: Server) -> dict:
    return {n: server.global_scaling * (b @ a) for n, (a, b) in server.global_factors.items()}


def test_two_rounds_write_a_complete_run_dir(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    server = run_federation(_cfg(), llm, tok, blocks, PARTS, tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["client"]) for m in lines] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(m["status"] == "ok" and m["steps"] == 2 for m in lines)
    assert json.loads((tmp_path / "state.json").read_text())["round"] == 2
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert 0 < rounds[-1]["energy_kept_min"] <= 1.0 + 1e-6
    factors, alpha = load_uniform_adapter(tmp_path / "adapters" / "round_002")
    for name, (a, b) in factors.items():
        torch.testing.assert_close(a, server.global_factors[name][0])
        torch.testing.assert_close(b, server.global_factors[name][1])
    # the global rank defaults to the sum of the client ranks
    assert next(iter(factors.values()))[0].shape[0] == 4


def test_global_adapter_loads_with_peft(setup_llm, tmp_path):
    from peft import PeftModel

    llm, tok, blocks = setup_llm
    server = run_federation(_cfg(rounds=1), llm, tok, blocks, PARTS, tmp_path, progress=False)
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    ref, _ = load_model("tiny-llama")
    with torch.no_grad():
        for name, delta in _final(server).items():
            ref.get_submodule(name).weight += delta
        want = ref(ids).logits
    fresh, _ = load_model("tiny-llama")
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "adapters" / "round_001")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, want, atol=1e-5, rtol=1e-4)


class _Crash(RuntimeError):
    pass


def _crash_after_first(rnd, _line):
    if rnd == 1:
        raise _Crash("simulated crash after round 1")


@pytest.mark.parametrize("broadcast", ["adapter", "merge"])
def test_resume_after_crash_ends_with_the_same_numbers(tmp_path, broadcast):
    def fresh():
        llm, tok = load_model("tiny-llama")
        blocks = extract_blocks(llm, tok, sparsities=(0.0, 0.5), method="wanda", pattern="unstructured",
                                calibration="one_shot", n_calib=4, seq_len=32, seed=0, texts=CALIB)
        return llm, tok, blocks

    cfg = _cfg(broadcast=broadcast)
    llm, tok, blocks = fresh()
    whole = run_federation(cfg, llm, tok, blocks, PARTS, tmp_path / "whole", progress=False)

    llm, tok, blocks = fresh()
    with pytest.raises(_Crash):
        run_federation(cfg, llm, tok, blocks, PARTS, tmp_path / "crashed", progress=False,
                       on_round=_crash_after_first)
    llm, tok, blocks = fresh()  # a new process: nothing survives but the run directory
    resumed = run_federation(cfg, llm, tok, blocks, PARTS, tmp_path / "crashed", resume=True, progress=False)
    if broadcast == "adapter":
        for name, delta in _final(whole).items():
            torch.testing.assert_close(_final(resumed)[name], delta, atol=1e-6, rtol=0)
    else:
        for name in whole.modules:
            torch.testing.assert_close(resumed.llm.get_submodule(name).weight, whole.llm.get_submodule(name).weight,
                                       atol=1e-6, rtol=0)
    m_whole = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    m_resumed = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss_last"] for x in m_whole] == pytest.approx(
        [json.loads(x)["loss_last"] for x in m_resumed], abs=1e-6)


def test_failed_client_is_recorded_and_round_goes_on(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    server = run_federation(_cfg(), llm, tok, blocks, PARTS, tmp_path, progress=False,
                            inject_failures={1: [1], 2: [0, 1]})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    status = {(m["round"], m["client"]): m["status"] for m in lines}
    assert status == {(1, 0): "ok", (1, 1): "failed", (2, 0): "failed", (2, 1): "failed"}
    assert "injected failure of client 1 in round 1" in lines[1]["error"]
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["clients"] == 1 and rounds[1]["clients"] == 0
    # round 2 had no survivors: the global state of round 1 stands
    r1, _ = load_uniform_adapter(tmp_path / "adapters" / "round_001")
    for name, (a, b) in r1.items():
        torch.testing.assert_close(server.global_factors[name][0], a)
        torch.testing.assert_close(server.global_factors[name][1], b)


def test_run_dir_guards(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    run_federation(_cfg(rounds=1), llm, tok, blocks, PARTS, tmp_path, progress=False)
    with pytest.raises(LegokitError, match="already holds a run"):
        run_federation(_cfg(rounds=1), llm, tok, blocks, PARTS, tmp_path, progress=False)
    with pytest.raises(LegokitError, match="different config.*fed.rounds"):
        run_federation(_cfg(rounds=3), llm, tok, blocks, PARTS, tmp_path, resume=True, progress=False)


def test_empty_client_is_refused_before_work(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    with pytest.raises(LegokitError, match="client 1 has no training data"):
        run_federation(_cfg(), llm, tok, blocks, [PARTS[0], []], tmp_path, progress=False)
    assert not (tmp_path / "config.yaml").exists()


def test_local_mode_keeps_one_adapter_per_client(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    run_federation(_cfg(aggregator="local"), llm, tok, blocks, PARTS, tmp_path, progress=False)
    a0, _ = load_uniform_adapter(tmp_path / "adapters" / "round_002" / "client_0")
    a1, _ = load_uniform_adapter(tmp_path / "adapters" / "round_002" / "client_1")
    name = next(iter(a0))
    assert not torch.equal(a0[name][1], a1[name][1])


def test_block_assignment_by_device_profile(setup_llm):
    _, _, blocks = setup_llm
    cfg = _cfg().with_overrides({"fed.devices": ["server", "laptop"]})
    assert assign_blocks(cfg, blocks) == [0, 1]  # laptop (55% budget) gets the 50% block
    cfg = _cfg().with_overrides({"fed.devices": ["server", "phone"]})
    with pytest.raises(LegokitError, match="fits no block"):
        assign_blocks(cfg, blocks)
