"""The strategy in the loop (tiny-llama): block assignment, client sampling, weighting, aggregation invariants,
the centralized reference, dropping a round's updates."""

import json

import pytest
import torch
from helpers import PARTS, aggregated, global_delta, run_tiny, tiny_config

from legokit.strategy import assign_blocks, sample_clients
from legokit.utils import LegokitError


def test_block_assignment_by_device_profile(setup_llm):
    _, _, blocks = setup_llm
    cfg = tiny_config().with_overrides({"fed.devices": ["server", "laptop"]})
    assert assign_blocks(cfg, blocks) == [0, 1]  # laptop (55% budget) gets the 50% block
    with pytest.raises(LegokitError, match="no level of prune.sparsities .* fits it"):  # the config refuses it early
        tiny_config().with_overrides({"fed.devices": ["server", "phone"]})
    with pytest.raises(LegokitError, match="fits no block"):  # blocks made elsewhere: the late check still holds
        assign_blocks(cfg, blocks[:1])


def test_uniform_weighting_is_heteagg_with_equal_sample_counts(setup_llm):
    uniform = global_delta(aggregated(setup_llm, (1, 7), weighting="uniform"))
    equal = global_delta(aggregated(setup_llm, (3, 3), weighting="samples"))
    heterofl = global_delta(aggregated(setup_llm, (1, 7), aggregator="heterofl"))
    weighted = global_delta(aggregated(setup_llm, (1, 7), weighting="samples"))
    for name, delta in uniform.items():
        torch.testing.assert_close(delta, equal[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(delta, heterofl[name], atol=1e-6, rtol=0)
    # where both clients own a coordinate, unequal sample counts do move the mean
    assert min(float((uniform[n] - weighted[n]).abs().max()) for n in uniform) > 1e-2


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
        tiny_config(fed={"sample_fraction": 0.0})
    with pytest.raises(LegokitError, match=r"sample_fraction=0.1 of 4 clients selects no client.*0.125"):
        sample_clients(0, 1, [0, 1, 2, 3], 0.1)


def test_only_sampled_clients_train(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    run_tiny(tiny_config(fed={"sample_fraction": 0.5}), llm, tok, blocks, PARTS, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    picks = [sample_clients(0, r, [0, 1], 0.5) for r in (1, 2)]
    assert [(m["round"], m["client"]) for m in lines] == [(r, k) for r, p in zip((1, 2), picks, strict=True) for k in p]
    assert all(len(p) == 1 for p in picks)


def test_heteagg_in_the_loop_ignores_client_order_and_a_common_weight_scale(setup_llm):
    ref = global_delta(aggregated(setup_llm, (2, 5)))
    reordered = global_delta(aggregated(setup_llm, (2, 5), order=[1, 0]))
    scaled = global_delta(aggregated(setup_llm, (20, 50)))
    other = global_delta(aggregated(setup_llm, (5, 2)))  # the weights themselves do matter
    for name, delta in ref.items():
        torch.testing.assert_close(reordered[name], delta, atol=1e-6, rtol=0)
        torch.testing.assert_close(scaled[name], delta, atol=1e-6, rtol=0)
    assert max(float((other[n] - ref[n]).abs().max()) for n in ref) > 1e-2


def test_centralized_is_one_pooled_client_on_the_dense_block(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    strategy = run_tiny(tiny_config(fed={"aggregator": "centralized", "rounds": 1}), llm, tok, blocks, PARTS, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # one client (index 0) on the dense block, on all 8 examples, for the steps of both clients together
    assert [(m["client"], m["block"], m["num_examples"], m["steps"]) for m in lines] == \
        [(0, "wanda-unstructured-0", 8, 4)]
    assert lines[0]["tasks"] == {"asdiv": 4, "boolq": 4}
    assert strategy.assignment == (0, 0)  # every client evaluates on the dense block
    # the broadcast is that one update, exactly (its rank 2 fits in the global rank 4)
    (res,) = strategy.last_results
    for name, delta in global_delta(strategy).items():
        a, b = res.factors[name]
        torch.testing.assert_close(delta, res.scaling * (b @ a), atol=1e-6, rtol=0)


def test_the_next_round_drops_the_previous_rounds_updates(setup_llm, tmp_path):
    # last_results serves analysis after a round; held through the next round's training, every client's
    # factors would add to that round's peak memory
    llm, tok, blocks = setup_llm
    strategy = run_tiny(tiny_config(fed={"rounds": 1}), llm, tok, blocks, PARTS, tmp_path)
    assert len(strategy.last_results) == 2
    tasks = strategy.configure(2)
    assert [t.client for t in tasks] == [0, 1] and strategy.last_results == []
