"""Privacy on tiny-llama: the exposure of a block mix, the DP owner mean (clipping, noise per owner count, local
mode), the accountant against opacus' own documented example, and the privacy config's bad input."""

import json
import math

import pytest
import torch
from helpers import PARTS, random_results, run_tiny, tiny_config

from legokit.aggregate import coverage, heterofl
from legokit.messages import ClientResult
from legokit.privacy.accountant import noise_for_epsilon, privacy_plan, privacy_spent, smallest_epsilon
from legokit.privacy.exposure import exposure, owner_count
from legokit.privacy.mechanism import clip_scales, noise_std_by_owners, privacy_lines
from legokit.strategy import build_strategy
from legokit.utils import LegokitError


# ----- the accountant ------------------------------------------------------------------------------------------------
def test_the_accountant_gives_opacus_documented_example():
    """opacus 1.6.0, ``opacus/accountants/analysis/rdp.py``, module docstring: the sampled Gaussian mechanism with
    ``[(q, sigma, steps)] = [(1e-5, 1.0, 10), (1e-4, 3.0, 4)]``, orders 2..32, delta 1e-5 gives
    ``(epsilon, order) = (0.336, 23)``."""
    eps, order = privacy_spent([(1.0, 1e-5, 10), (3.0, 1e-4, 4)], delta=1e-5, orders=range(2, 33))
    assert eps == pytest.approx(0.336, abs=5e-4) and order == 23


def test_a_target_epsilon_gives_the_noise_that_spends_it_and_more_rounds_need_more_noise():
    sigma = noise_for_epsilon(8.0, 1e-5, 1.0, 2)
    eps = privacy_spent([(sigma, 1.0, 2)], 1e-5)[0]
    assert 7.9 < eps <= 8.0
    assert noise_for_epsilon(8.0, 1e-5, 1.0, 8) > sigma
    assert privacy_spent([(sigma, 0.5, 2)], 1e-5)[0] < eps  # sampling amplifies privacy
    assert privacy_spent([(sigma, 1.0, 2)], 1e-5, accountant="prv")[0] == pytest.approx(eps, rel=0.2)


def test_an_unreachable_target_epsilon_names_the_smallest_reachable_one():
    floor = smallest_epsilon(1e-5, 1.0, 2)
    assert 0 < floor < 1
    with pytest.raises(LegokitError, match=f"smallest reachable epsilon is {floor:.3g}"):
        tiny_config(privacy={"mode": "central", "target_epsilon": floor / 2})


# ----- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("privacy, match", [
    ({"mode": "central", "target_epsilon": 0}, "target_epsilon=0.0 must be a finite number > 0"),
    ({"mode": "central", "target_epsilon": -1.0}, "target_epsilon=-1.0 must be"),
    ({"mode": "central", "noise_multiplier": 1.0, "delta": 0.0}, r"delta=0.0 must be in \(0, 1\)"),
    ({"mode": "central", "noise_multiplier": 1.0, "delta": 0.5}, r"delta=0.5 must be below 1/num_clients = 0.5"),
    ({"mode": "central", "noise_multiplier": 1.0, "clip": 0}, "clip=0.0 must be a finite number > 0"),
    ({"mode": "central", "noise_multiplier": 1.0, "target_epsilon": 8}, "are both set: give one"),
    ({"mode": "central"}, "needs privacy.target_epsilon"),
    ({"mode": "central", "noise_multiplier": 1.0, "min_owners": 3}, "min_owners=3 exceeds fed.num_clients=2"),
    ({"mode": "secret"}, "privacy.mode='secret' is unknown"),
])
def test_bad_privacy_settings_are_refused_at_load(privacy, match):
    with pytest.raises(LegokitError, match=match):
        tiny_config(privacy=privacy)


@pytest.mark.parametrize("aggregator", ["fedavg", "flora", "flexlora", "fedavg_delta", "local", "centralized"])
def test_dp_with_an_aggregator_it_does_not_support_names_those_it_does(aggregator):
    with pytest.raises(LegokitError, match=r"does not support fed.aggregator=.*\['heteagg', 'heterofl'\]"):
        tiny_config(fed={"aggregator": aggregator}, privacy={"mode": "central", "noise_multiplier": 1.0})


def test_privacy_off_builds_the_plain_strategy(setup_llm):
    llm, _, blocks = setup_llm
    assert privacy_plan(tiny_config()) is None
    assert build_strategy(tiny_config(), llm, blocks, progress=False).privacy is None


# ----- exposure -----------------------------------------------------------------------------------------------------
def test_exposure_counts_owners_and_the_weights_only_one_client_owns():
    t, f = True, False
    a = {"m": torch.tensor([[t, t, t], [t, t, t]])}  # dense: owns everything
    b = {"m": torch.tensor([[t, t, f], [t, f, f]])}
    c = {"m": torch.tensor([[t, f, f], [f, f, f]])}
    ex = exposure([a, b, c], ["a", "b", "c"])
    # owners per weight: [[3, 2, 1], [2, 1, 1]]
    assert ex["owners"] == pytest.approx([0, 3 / 6, 2 / 6, 1 / 6])
    assert ex["sole"] == pytest.approx({"a": 3 / 6, "b": 0.0, "c": 0.0})
    assert ex["modules"]["m"]["owners"] == ex["owners"] and ex["weights"] == 6
    # clients on one block are counted once per client, whether they pass one mapping or equal copies
    shared = exposure([b, b, c], ["x", "y", "z"])
    assert owner_count([b, b, c], "m").tolist() == coverage([b, dict(b), c], "m").tolist()
    assert shared["sole"] == pytest.approx({"x": 0.0, "y": 0.0, "z": 0.0})  # c owns nothing b does not
    with pytest.raises(LegokitError, match="client labels repeat"):
        exposure([a, b], ["a", "a"])


def test_a_run_summary_prints_exposure_and_the_epsilon_spent():
    results = {"exposure": {"owners": [0.0, 0.25, 0.75], "sole": {"client-0": 0.25, "client-1": 0.0}},
               "privacy": {"mode": "central", "epsilon": 7.99, "delta": 1e-5, "accountant": "rdp", "steps": 2,
                           "sample_rate": 1.0, "noise_multiplier": 0.9, "clip": 0.01, "released_share": 0.75,
                           "min_owners": 2}}
    text = "\n".join(privacy_lines(results))
    assert "25.0% of the weights have a single owner" in text and "client-0 25.0%" in text
    assert "epsilon spent 7.99 at delta 1e-05" in text and "weights released 75.0%" in text


# ----- the DP owner mean --------------------------------------------------------------------------------------------
def _dp(setup_llm, mode="central", **privacy):
    llm, _, blocks = setup_llm
    cfg = tiny_config(privacy={"mode": mode, **privacy})
    strategy = build_strategy(cfg, llm, blocks, progress=False)
    return strategy, [b.masks for b in blocks]  # client k holds block k


def _run(strategy, population, results):
    """The DP ΔW_g of every module for a round that started from B = 0 (so ΔW_0 = 0)."""
    updates = strategy.updates(results)
    bases = {n: torch.zeros(strategy.shapes[n]) for n in strategy.modules}
    metrics = strategy.privacy.start_round(1, updates, bases, population)
    return metrics, {n: strategy.privacy.combine(updates, n, bases[n], None, "zero") for n in strategy.modules}


def test_without_noise_or_binding_clip_the_dp_owner_mean_is_heterofl(setup_llm):
    strategy, population = _dp(setup_llm, noise_multiplier=0.0, clip=1e9, min_owners=1)
    results = random_results(setup_llm[0], [3, 5])
    metrics, out = _run(strategy, population, results)
    assert metrics["dp_clipped"] == 0
    want = heterofl(strategy.updates(results), None, "zero")
    for n in strategy.modules:
        torch.testing.assert_close(out[n], want[n], rtol=1e-5, atol=1e-6)


def test_each_client_is_clipped_to_the_norm_over_all_modules(setup_llm):
    clip = 0.5
    strategy, population = _dp(setup_llm, noise_multiplier=0.0, clip=clip, min_owners=1)
    results = random_results(setup_llm[0], [3, 5])
    metrics, out = _run(strategy, population, results)
    updates = strategy.updates(results)
    norms = [math.sqrt(sum(float(u.masked_delta(n).square().sum()) for n in strategy.modules)) for u in updates]
    assert metrics["dp_norms"] == pytest.approx(norms, rel=1e-5) and min(norms) > clip
    assert metrics["dp_clipped"] == 2 and clip_scales([0.2, 2.0], 0.5) == [1.0, 0.25]
    # the result is HeteroFL over the updates scaled to norm `clip`
    scaled = [ClientResult(r.client, {n: (a, b * clip / nk) for n, (a, b) in r.factors.items()}, r.scaling,
                           r.num_examples) for r, nk in zip(results, norms, strict=True)]
    want = heterofl(strategy.updates(scaled), None, "zero")
    for n in strategy.modules:
        torch.testing.assert_close(out[n], want[n], rtol=1e-4, atol=1e-7)


def _zero_updates(setup_llm):
    results = random_results(setup_llm[0], [1, 1])
    return [ClientResult(r.client, {n: (a, torch.zeros_like(b)) for n, (a, b) in r.factors.items()}, r.scaling, 1)
            for r in results]


def _std_by_count(out, population, names):
    counts = {n: owner_count(population, n) for n in names}
    return {c: float(torch.cat([out[n][counts[n] == c] for n in names]).std()) for c in (1, 2)}


@pytest.mark.parametrize("mode", ["central", "local"])
def test_the_noise_per_weight_falls_with_its_owner_count_as_documented(setup_llm, mode):
    """Zero updates: what comes out is the noise alone; its std on weights owned by 1 and 2 clients matches
    ``noise_std_by_owners`` (central z C / c, local 2 z C / sqrt(c)); with min_owners=2 single-owner weights stay."""
    strategy, population = _dp(setup_llm, mode, noise_multiplier=2.0, clip=0.5, min_owners=1)
    _, out = _run(strategy, population, _zero_updates(setup_llm))
    measured = _std_by_count(out, population, strategy.modules)
    want = noise_std_by_owners(strategy.privacy.plan, 2)
    assert want[1] == pytest.approx(2.0 * 0.5 * (1 if mode == "central" else 2))
    for c in (1, 2):
        assert measured[c] == pytest.approx(want[c], rel=0.05), (c, measured, want)

    strategy, population = _dp(setup_llm, mode, noise_multiplier=2.0, clip=0.5)  # min_owners=2, the default
    _, out = _run(strategy, population, _zero_updates(setup_llm))
    for n in strategy.modules:
        single = owner_count(population, n) == 1
        assert bool(single.any()) and float(out[n][single].abs().max()) == 0.0  # not released: previous (0 here)
        assert float(out[n][~single].std()) == pytest.approx(want[2], rel=0.1)


def test_the_noise_is_seeded_by_round_and_module(setup_llm):
    strategy, population = _dp(setup_llm, noise_multiplier=1.0, clip=0.1)
    _, a = _run(strategy, population, _zero_updates(setup_llm))
    _, b = _run(strategy, population, _zero_updates(setup_llm))
    n0, n1 = strategy.modules[:2]
    assert torch.equal(a[n0], b[n0]) and not torch.equal(a[n0].flatten()[:8], a[n1].flatten()[:8])


def test_a_dp_round_runs_in_the_loop_and_records_its_clipping(setup_llm, tmp_path):
    llm, tok, blocks = setup_llm
    cfg = tiny_config(fed={"rounds": 1}, privacy={"mode": "central", "target_epsilon": 8.0, "clip": 0.05})
    run_tiny(cfg, llm, tok, blocks, PARTS, tmp_path)
    rnd = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[0])
    assert len(rnd["dp_norms"]) == 2 and rnd["dp_noise_std"] == pytest.approx(privacy_plan(cfg).noise_std)


def test_the_exposure_picture_draws_each_kind_and_each_client(setup_llm):
    from legokit import viz

    _, _, blocks = setup_llm
    ex = exposure([b.masks for b in blocks], ["client-0", "client-1"])
    fig = viz.plot_exposure(ex)
    ax, ax_sole = fig.axes[:2]
    kinds = {n.rsplit(".", 1)[-1] for n in ex["modules"]}
    assert [t.get_text() for t in ax.get_yticklabels()] == [*dict.fromkeys(n.rsplit(".", 1)[-1]
                                                                           for n in ex["modules"]), "all"]
    assert len(kinds) >= 2 and len(ax.patches) == 3 * (len(kinds) + 1)  # owner counts 0, 1, 2 per row
    widths = [p.get_width() for p in ax_sole.patches]
    assert widths == pytest.approx([100 * ex["sole"]["client-0"], 0.0]) and widths[0] > 0  # dense owns alone
