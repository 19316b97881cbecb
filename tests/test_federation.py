"""The one round loop on tiny-llama: checkpoints, resume equality, failures, conditions, invariants, peft output."""

import json

import pytest
import torch

from legokit.aggregate import AGGREGATORS
from legokit.blocks import extract_blocks
from legokit.broadcast import load_uniform_adapter
from legokit.client import local_update
from legokit.config import ExperimentConfig
from legokit.data import Example
from legokit.federation import federation, run_federation
from legokit.models import linear_modules, load_model
from legokit.rounds import ClientResult
from legokit.strategy import LegoStrategy, assign_blocks, build_strategy, sample_clients
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


def _blocks(llm, tok) -> list:
    return extract_blocks(llm, tok, sparsities=(0.0, 0.5), method="wanda", pattern="unstructured",
                          calibration="one_shot", n_calib=4, seq_len=32, seed=0, texts=CALIB)


@pytest.fixture(scope="module")
def setup_llm(tiny):
    """The module's shared tiny-llama (read-only: adapter-mode runs only) and its blocks at 0 and 50%."""
    llm, tok = tiny
    return llm, tok, _blocks(llm, tok)


def _fresh_setup():
    """A new tiny-llama and blocks, for runs that change them (merge mode) or must start from scratch."""
    llm, tok = load_model("tiny-llama", device="cpu")
    return llm, tok, _blocks(llm, tok)


PARTS = [_examples("boolq", 4), _examples("asdiv", 4)]


def _final(strategy: LegoStrategy) -> dict:
    """The global ΔW_g per module, (out, in), of an adapter-mode strategy."""
    factors, scaling = strategy.broadcast.adapter_for(None)
    return {n: scaling * (b @ a) for n, (a, b) in factors.items()}


def _run(cfg, llm, tok, blocks, parts, run_dir, **kwargs) -> LegoStrategy:
    return run_federation(cfg, llm, tok, blocks, parts, run_dir, progress=False, **kwargs).strategy


def test_two_rounds_write_a_complete_run_dir(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    server = _run(_cfg(), llm, tok, blocks, PARTS, tmp_path)
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
    final = _final(server)
    for name in server.modules:
        a, b = prev_factors[name]
        want = AGGREGATORS["heteagg"](server.updates(results, [name]), {name: prev_scaling * (b @ a)}, "keep")[name]
        s2 = torch.linalg.svdvals(want.double()) ** 2
        assert energy[name] == pytest.approx(float(s2[:4].sum() / s2.sum()), rel=1e-4), name
        residual = float((final[name] - want).double().square().sum())
        assert residual == pytest.approx(float(s2[4:].sum()), rel=1e-3, abs=1e-10), name  # Eckart-Young


def test_global_adapter_loads_with_peft(setup_llm, tmp_path):
    from peft import PeftModel

    llm, tok, blocks = setup_llm
    server = _run(_cfg(rounds=1), llm, tok, blocks, PARTS, tmp_path)
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    ref, _ = load_model("tiny-llama", device="cpu")
    with torch.no_grad():
        for name, delta in _final(server).items():
            ref.get_submodule(name).weight += delta
        want = ref(ids).logits
    fresh, _ = load_model("tiny-llama", device="cpu")
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
    cfg = _cfg(broadcast=broadcast)
    llm, tok, blocks = _fresh_setup()
    whole = _run(cfg, llm, tok, blocks, PARTS, tmp_path / "whole")
    llm_whole = llm

    llm, tok, blocks = _fresh_setup()
    with pytest.raises(_Crash):
        run_federation(cfg, llm, tok, blocks, PARTS, tmp_path / "crashed", progress=False,
                       on_round=_crash_after_first)
    llm, tok, blocks = _fresh_setup()  # a new process: nothing survives but the run directory
    resumed = _run(cfg, llm, tok, blocks, PARTS, tmp_path / "crashed", resume=True)
    if broadcast == "adapter":
        for name, delta in _final(whole).items():
            torch.testing.assert_close(_final(resumed)[name], delta, atol=1e-6, rtol=0)
    else:
        for name in whole.modules:
            torch.testing.assert_close(llm.get_submodule(name).weight, llm_whole.get_submodule(name).weight,
                                       atol=1e-6, rtol=0)
    m_whole = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    m_resumed = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss_last"] for x in m_whole] == pytest.approx(
        [json.loads(x)["loss_last"] for x in m_resumed], abs=1e-6)


def test_failed_client_is_recorded_and_round_goes_on(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    server = _run(_cfg(), llm, tok, blocks, PARTS, tmp_path, inject_failures={1: [1], 2: [0, 1]})
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


def test_local_mode_keeps_one_adapter_per_client_and_shares_nothing(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    run_federation(_cfg(aggregator="local"), llm, tok, blocks, PARTS, tmp_path / "a", progress=False)
    # the same run with other data at client 1: nothing of client 1 may reach client 0
    other = [PARTS[0], _examples("piqa", 4)]
    run_federation(_cfg(aggregator="local"), llm, tok, blocks, other, tmp_path / "b", progress=False)

    def adapter(run: str, rnd: int, client: int) -> dict:
        return load_uniform_adapter(tmp_path / run / "adapters" / f"round_{rnd:03d}" / f"client_{client}")[0]

    a0, b0, a1, b1 = adapter("a", 2, 0), adapter("b", 2, 0), adapter("a", 2, 1), adapter("b", 2, 1)
    assert sorted(a0) == sorted(a1) and len(a0) == 14
    for name in a0:
        assert torch.equal(a0[name][0], b0[name][0]) and torch.equal(a0[name][1], b0[name][1]), name
    assert not all(torch.equal(a1[n][1], b1[n][1]) for n in a1)  # client 1's own data does matter
    # round 2 went on from the client's own round-1 adapter
    first, scaling = load_uniform_adapter(tmp_path / "a" / "adapters" / "round_001" / "client_0")
    again = local_update(_cfg(aggregator="local"), blocks[0], tok, PARTS[0], first, scaling, client=0, rnd=2,
                         progress=False)
    for name, (a, b) in again.factors.items():
        torch.testing.assert_close(a, a0[name][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(b, a0[name][1], atol=1e-6, rtol=0)


def test_block_assignment_by_device_profile(setup_llm):
    _, _, blocks = setup_llm
    cfg = _cfg().with_overrides({"fed.devices": ["server", "laptop"]})
    assert assign_blocks(cfg, blocks) == [0, 1]  # laptop (55% budget) gets the 50% block
    with pytest.raises(LegokitError, match="no level of prune.sparsities .* fits it"):  # the config refuses it early
        _cfg().with_overrides({"fed.devices": ["server", "phone"]})
    with pytest.raises(LegokitError, match="fits no block"):  # blocks made elsewhere: the late check still holds
        assign_blocks(cfg, blocks[:1])


# ----- aggregation and broadcast invariants ---------------------------------------------------------------
def _random_results(llm, counts, seed: int = 0, rank: int = 2, scaling: float = 2.0) -> list[ClientResult]:
    """Hand-made client results: random factors (the same for a given seed, whatever the counts)."""
    gen = torch.Generator().manual_seed(seed)
    return [ClientResult(client=k, scaling=scaling, num_examples=n,
                         factors={name: (torch.randn(rank, m.in_features, generator=gen),
                                         torch.randn(m.out_features, rank, generator=gen))
                                  for name, m in linear_modules(llm).items()})
            for k, n in enumerate(counts)]


def _aggregated(setup_llm, counts, order=None, **fed) -> LegoStrategy:
    """A strategy after aggregating hand-made results of ``counts`` (in client ``order``, default 0, 1, ...)."""
    llm, _, blocks = setup_llm
    strategy = build_strategy(_cfg(**fed), llm, blocks, progress=False)
    results = _random_results(llm, counts)
    strategy.aggregate(1, [results[k] for k in (order or range(len(counts)))])
    return strategy


def test_uniform_weighting_is_heteagg_with_equal_sample_counts(setup_llm):
    uniform = _final(_aggregated(setup_llm, (1, 7), weighting="uniform"))
    equal = _final(_aggregated(setup_llm, (3, 3), weighting="samples"))
    heterofl = _final(_aggregated(setup_llm, (1, 7), aggregator="heterofl"))
    weighted = _final(_aggregated(setup_llm, (1, 7), weighting="samples"))
    for name, delta in uniform.items():
        torch.testing.assert_close(delta, equal[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(delta, heterofl[name], atol=1e-6, rtol=0)
    # where both clients own a coordinate, unequal sample counts do move the mean
    assert min(float((uniform[n] - weighted[n]).abs().max()) for n in uniform) > 1e-2


def test_flexlora_broadcasts_the_client_rank_and_heteagg_the_global_rank(setup_llm):
    counts = (1, 3)
    flex = _aggregated(setup_llm, counts, aggregator="flexlora")
    hete = _aggregated(setup_llm, counts)
    r, alpha = flex.cfg.lora.rank, flex.cfg.lora.alpha
    assert flex.broadcast.scaling == alpha / r and hete.broadcast.scaling == alpha / (2 * r)
    for k in range(2):  # every client starts the next round at its own rank r
        factors, scaling = flex.start_state(k)
        assert scaling == alpha / r
        assert all(a.shape[0] == b.shape[1] == r for a, b in factors.values())
    assert all(a.shape[0] == 2 * r for a, _ in hete.broadcast.factors.values())
    # FlexLoRA's broadcast is the best rank-r approximation of Σ p_k s_k B_k A_k (Eckart-Young)
    final = _final(flex)
    p = [n / sum(counts) for n in counts]
    for name in flex.modules:
        dense = sum(pk * res.scaling * (res.factors[name][1] @ res.factors[name][0])
                    for pk, res in zip(p, flex.last_results, strict=True))
        s2 = torch.linalg.svdvals(dense.double()) ** 2
        assert float((final[name] - dense).double().square().sum()) == pytest.approx(float(s2[r:].sum()), rel=1e-3)


@pytest.mark.parametrize(("num_clients", "fraction", "expected"),
                         [(4, 0.5, 2), (10, 0.3, 3), (5, 1.0, 5), (4, 0.625, 3)])
def test_sample_fraction_picks_the_expected_number_of_clients(num_clients, fraction, expected):
    clients = list(range(num_clients))
    picks = [sample_clients(0, rnd, clients, fraction) for rnd in range(1, 31)]
    for p in picks:
        assert len(p) == expected and p == sorted(set(p)) and set(p) <= set(clients)
    assert picks == [sample_clients(0, rnd, clients, fraction) for rnd in range(1, 31)]  # f(seed, round)
    assert picks != [sample_clients(1, rnd, clients, fraction) for rnd in range(1, 31)] or expected == num_clients
    if expected < num_clients:  # another draw each round, and over 30 rounds everybody takes part
        assert len({tuple(p) for p in picks}) > 1 and set().union(*picks) == set(clients)


def test_a_fraction_that_selects_nobody_is_refused():
    with pytest.raises(LegokitError, match="sample_fraction"):
        _cfg(sample_fraction=0.0)
    with pytest.raises(LegokitError, match=r"sample_fraction=0.1 of 4 clients selects no client.*0.125"):
        sample_clients(0, 1, [0, 1, 2, 3], 0.1)


def test_only_sampled_clients_train(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    _run(_cfg(sample_fraction=0.5), llm, tok, blocks, PARTS, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    picks = [sample_clients(0, r, [0, 1], 0.5) for r in (1, 2)]
    assert [(m["round"], m["client"]) for m in lines] == [(r, k) for r, p in zip((1, 2), picks, strict=True) for k in p]
    assert all(len(p) == 1 for p in picks)


def test_full_rank_adapter_broadcast_equals_merge_after_one_round(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    # global_rank 64 = min(out, in) of every module (64 x 64, 32 x 64, 128 x 64, 64 x 128): nothing is cut
    adapter = _run(_cfg(rounds=1, global_rank=64), llm, tok, blocks, PARTS, tmp_path / "adapter")
    rounds = [json.loads(x) for x in (tmp_path / "adapter" / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["energy_kept_min"] == pytest.approx(1.0, abs=1e-6)
    llm_m, tok_m, blocks_m = _fresh_setup()  # merge mode changes the LLM and the blocks
    run_federation(_cfg(rounds=1, broadcast="merge"), llm_m, tok_m, blocks_m, PARTS, tmp_path / "merge",
                   progress=False)
    for name, delta in _final(adapter).items():
        torch.testing.assert_close(llm_m.get_submodule(name).weight, llm.get_submodule(name).weight + delta,
                                   atol=1e-5, rtol=0)
        # and the 50% block took the same update through its mask
        want = blocks[1].masks[name] * (llm.get_submodule(name).weight + delta)
        torch.testing.assert_close(blocks_m[1].model.get_submodule(name).weight, want, atol=1e-5, rtol=0)
    blocks[1].release()
    blocks_m[1].release()


def test_heteagg_in_the_loop_ignores_client_order_and_a_common_weight_scale(setup_llm):
    ref = _final(_aggregated(setup_llm, (2, 5)))
    reordered = _final(_aggregated(setup_llm, (2, 5), order=[1, 0]))
    scaled = _final(_aggregated(setup_llm, (20, 50)))
    other = _final(_aggregated(setup_llm, (5, 2)))  # the weights themselves do matter
    for name, delta in ref.items():
        torch.testing.assert_close(reordered[name], delta, atol=1e-6, rtol=0)
        torch.testing.assert_close(scaled[name], delta, atol=1e-6, rtol=0)
    assert max(float((other[n] - ref[n]).abs().max()) for n in ref) > 1e-2


def test_centralized_is_one_pooled_client_on_the_dense_block(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    strategy = _run(_cfg(aggregator="centralized", rounds=1), llm, tok, blocks, PARTS, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # one client (index 0) on the dense block, on all 8 examples, for the steps of both clients together
    assert [(m["client"], m["block"], m["num_examples"], m["steps"]) for m in lines] == \
        [(0, "wanda-unstructured-0", 8, 4)]
    assert lines[0]["tasks"] == {"asdiv": 4, "boolq": 4}
    assert strategy.assignment == (0, 0)  # every client evaluates on the dense block
    # the broadcast is that one update, exactly (its rank 2 fits in the global rank 4)
    (res,) = strategy.last_results
    for name, delta in _final(strategy).items():
        a, b = res.factors[name]
        torch.testing.assert_close(delta, res.scaling * (b @ a), atol=1e-6, rtol=0)


def test_a_structured_block_client_trains_in_the_loop_and_its_update_stays_in_its_rows(tiny_fresh, tmp_path):
    llm, tok = tiny_fresh
    blocks = extract_blocks(llm, tok, sparsities=(0.0, 0.5), method="wanda", pattern="structured",
                            calibration="one_shot", n_calib=4, seq_len=32, seed=0, texts=CALIB)
    strategy = _run(_cfg(rounds=1), llm, tok, blocks, PARTS, tmp_path)
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
    whole = _run(_cfg(), llm, tok, blocks, PARTS, tmp_path / "run")
    fed = federation(_cfg(), llm, tok, blocks, PARTS, tmp_path / "step", progress=False)
    first = fed.step()
    assert (first.round, fed.round, [r.client for r in first.results]) == (1, 1, [0, 1])
    assert [ln["round"] for ln in first.lines] == [1, 1] and "energy_kept_mean" in first.metrics
    fed.step()
    assert fed.done
    with pytest.raises(LegokitError, match="all 2 rounds are done"):
        fed.step()
    for name, delta in _final(whole).items():
        torch.testing.assert_close(_final(fed.strategy)[name], delta, atol=0, rtol=0)


def test_an_update_that_does_not_fit_the_llm_is_recorded_as_failed(setup_llm, tmp_path):
    from legokit.federation import Exchange, Outcome

    llm, tok, blocks = setup_llm
    fed = federation(_cfg(rounds=1), llm, tok, blocks, PARTS, tmp_path, progress=False)
    tasks = fed.strategy.configure(1)
    good, bad = _random_results(llm, (4, 4))
    name = next(iter(bad.factors))
    bad.factors[name] = (bad.factors[name][0][:, :3], bad.factors[name][1])  # A cut to 3 input columns
    done = fed.finish(1, Exchange([Outcome(tasks[0], good), Outcome(tasks[1], bad)]), started=0.0)
    assert [ln["status"] for ln in done.lines] == ["ok", "failed"]
    assert f"client 1: factors for {name} have shapes A (2, 3)" in done.lines[1]["error"]
    assert done.metrics["clients"] == 1 and done.metrics["failed"] == [1]


def test_the_next_round_drops_the_previous_rounds_updates(setup_llm, tmp_path):
    # last_results serves analysis after a round; held through the next round's training, every client's
    # factors would add to that round's peak memory
    llm, tok, blocks = setup_llm
    strategy = _run(_cfg(rounds=1), llm, tok, blocks, PARTS, tmp_path)
    assert len(strategy.last_results) == 2
    tasks = strategy.configure(2)
    assert [t.client for t in tasks] == [0, 1] and strategy.last_results == []
