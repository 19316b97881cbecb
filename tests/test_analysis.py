"""legokit.analysis on tiny-llama: re-aggregation, errors against the owner mean, energy, apply_delta; and the
explorer widgets of 02 and 03 that draw them."""

import json

import numpy as np
import pytest
import torch
from helpers import CALIB, make_examples

from legokit import widgets
from legokit.aggregate import AGGREGATORS
from legokit.analysis import (
    AggregatedDeltas,
    aggregation_errors,
    apply_delta,
    block_cost_table,
    block_update,
    blocks_for_budgets,
    client_masks,
    client_table,
    client_updates,
    coverage_table,
    energy_by_rank,
    main_task,
    owner_mean,
    read_metrics,
    reaggregate,
    response_nll,
    task_mix,
    update_norm_table,
)
from legokit.blocks import extract_blocks
from legokit.config import ExperimentConfig
from legokit.data import Example, tokenize_example
from legokit.evaluate import evaluate_examples
from legokit.federation import block_model, run_federation
from legokit.lora import svd_refactor
from legokit.messages import ClientResult
from legokit.models import linear_modules
from legokit.slm import materialize
from legokit.strategy import build_strategy
from legokit.utils import LegokitError

SPARSITIES = (0.0, 0.5, 0.75)


def _cfg(sparsities=SPARSITIES, **fed) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "model": "tiny-llama",
        "prune": {"sparsities": list(SPARSITIES), "n_calib": 4, "seq_len": 32},
        "lora": {"rank": 2, "alpha": 4.0},
        "train": {"local_steps": 2, "batch_size": 2, "max_len": 64, "lr": 0.01},
        "fed": {"num_clients": len(sparsities), "rounds": 1, "client_sparsities": list(sparsities), **fed},
        "data": {"tasks": ["boolq", "asdiv"], "train_examples": 8},
    })


@pytest.fixture(scope="module")
def tiny_blocks(tiny):
    """The module's shared tiny-llama (read-only) and its Wanda blocks at 0/50/75%."""
    llm, tok = tiny
    blocks = extract_blocks(llm, tok, sparsities=SPARSITIES, method="wanda", pattern="unstructured",
                            calibration="one_shot", n_calib=4, seq_len=32, seed=0, texts=CALIB)
    return llm, tok, blocks


def _server_with_random_results(tiny_blocks, sparsities=SPARSITIES, weights=(1, 2, 5)):
    """A strategy and hand-made ClientResults (random factors, different sample counts)."""
    llm, _, blocks = tiny_blocks
    server = build_strategy(_cfg(sparsities), llm, blocks, progress=False)
    gen = torch.Generator().manual_seed(0)
    results = []
    for k, n in enumerate(weights):
        factors = {name: (torch.randn(2, m.in_features, generator=gen), torch.randn(m.out_features, 2, generator=gen))
                   for name, m in linear_modules(llm).items()}
        results.append(ClientResult(client=k, factors=factors, scaling=2.0, num_examples=n))
    return server, results


def test_heteagg_is_the_exact_owner_mean_and_fedavg_delta_dilutes(tiny_blocks):
    server, results = _server_with_random_results(tiny_blocks)
    errors = aggregation_errors(server, results, progress=False)
    assert set(errors["aggregator"]) == set(AGGREGATORS)
    assert len(errors) == len(server.modules) * len(AGGREGATORS)
    by = errors.groupby("aggregator")
    assert by["rel_error"].max()["heteagg"] < 1e-5
    assert abs(by["dilution"].mean()["heteagg"] - 1) < 1e-5
    # pruned zeros pull fedavg_delta towards 0 on coordinates not every client owns: there it is the owners'
    # share of the weight times their mean, 1/8 (the dense client alone) or 3/8 (dense and 50%) of it
    dil = errors[errors["aggregator"] == "fedavg_delta"]["dilution"]
    assert dil.between(1 / 8 - 1e-6, 3 / 8 + 1e-6).all() and dil.max() - dil.min() > 0.01
    assert by["rel_error"].min()["fedavg_delta"] > 0.05
    # heterofl ignores the (unequal) sample weights: a real, nonzero error
    assert by["rel_error"].min()["heterofl"] > 1e-3
    # nested masks at 0/50/75%: the 25% the sparsest client keeps is owned by all, the other 75% partially
    np.testing.assert_allclose(errors["partial_fraction"], 0.75)


def test_reaggregate_matches_the_aggregators_and_the_reference(tiny_blocks):
    server, results = _server_with_random_results(tiny_blocks)
    name = server.modules[3]
    deltas = reaggregate(server, results, [name], ["heteagg", "flora"])
    ref = owner_mean(client_updates(server, results, [name]), name)
    torch.testing.assert_close(deltas["heteagg"][name].double(), ref, rtol=1e-5, atol=1e-6)
    # flora is mask-agnostic: the plain weighted mean of the products
    p = np.array([r.num_examples for r in results], dtype=float)
    p /= p.sum()
    want = sum(pk * r.scaling * (r.factors[name][1] @ r.factors[name][0]) for pk, r in zip(p, results, strict=True))
    torch.testing.assert_close(deltas["flora"][name], want.float(), rtol=1e-5, atol=1e-5)


def test_all_dense_clients_make_the_mask_aware_rules_agree(tiny_blocks):
    server, results = _server_with_random_results(tiny_blocks, sparsities=(0.0, 0.0, 0.0))
    errors = aggregation_errors(server, results, ["heteagg", "fedavg_delta", "flexlora"], progress=False)
    assert errors["rel_error"].max() < 1e-5
    assert errors["dilution"].isna().all()  # no partially owned coordinate


def test_lazy_deltas_and_apply_delta_restore_exactly(tiny_blocks):
    llm, _, _ = tiny_blocks
    server, results = _server_with_random_results(tiny_blocks)
    lazy = AggregatedDeltas(server, results, "heteagg")
    assert list(lazy) == server.modules and len(lazy) == len(server.modules)
    before = {n: p.detach().clone() for n, p in llm.named_parameters()}
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        base = llm(ids).logits
    name = server.modules[0]
    with apply_delta(llm, lazy) as model, torch.no_grad():
        torch.testing.assert_close(model.get_submodule(name).weight, before[f"{name}.weight"] + lazy[name])
        assert not torch.allclose(model(ids).logits, base)
    for n, p in llm.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(RuntimeError), apply_delta(llm, {name: lazy[name]}):
        raise RuntimeError("boom")
    assert torch.equal(llm.get_submodule(name).weight, before[f"{name}.weight"])
    with pytest.raises(LegokitError, match="shape"), apply_delta(llm, {name: torch.zeros(3, 3)}):
        pass
    assert torch.equal(llm.get_submodule(name).weight, before[f"{name}.weight"])


def test_energy_by_rank_is_monotone_and_matches_svd_refactor():
    gen = torch.Generator().manual_seed(1)
    low = torch.randn(20, 3, generator=gen) @ torch.randn(3, 30, generator=gen)  # rank 3
    e = energy_by_rank(low, [1, 2, 3, 4, 100])
    assert np.all(np.diff(e) >= -1e-12) and e[2] == pytest.approx(1.0) and e[-1] == 1.0
    full = torch.randn(20, 30, generator=gen)
    for r in (1, 5, 12):
        assert energy_by_rank(full, [r])[0] == pytest.approx(svd_refactor(full, r, 1.0)[2], rel=1e-5)
    assert energy_by_rank(torch.zeros(4, 5), [1, 2]).tolist() == [1.0, 1.0]
    with pytest.raises(LegokitError):
        energy_by_rank(full, [0])


def test_coverage_table_counts_nested_owners(tiny_blocks):
    server, _ = _server_with_random_results(tiny_blocks)
    table = coverage_table(client_masks(server))
    fracs = table[[f"owners_{c}" for c in range(4)]]
    np.testing.assert_allclose(fracs.sum(axis=1), 1.0)
    # nested Wanda masks at 0/50/75%: every coordinate owned by the dense client; 1.75 owners on average
    assert (table["owners_0"] == 0).all()
    np.testing.assert_allclose(table["mean_owners"], 1.75, atol=1e-9)
    np.testing.assert_allclose(table["owners_3"], 0.25, atol=1e-9)


def test_update_norm_table_is_masked(tiny_blocks):
    server, results = _server_with_random_results(tiny_blocks)
    updates = client_updates(server, results)
    masked, raw = update_norm_table(updates), update_norm_table(updates, masked=False)
    assert len(masked) == len(results) * len(server.modules)
    dense = masked["client"] == "client-0"
    np.testing.assert_allclose(masked[dense]["norm"], raw[dense]["norm"], rtol=1e-6)
    assert (masked[~dense]["norm"].values < raw[~dense]["norm"].values).all()


def test_client_table_costs_shrink_with_sparsity(tiny_blocks):
    llm, _, blocks = tiny_blocks
    parts = [make_examples("boolq", 3), make_examples("asdiv", 2) + make_examples("boolq", 1),
             make_examples("asdiv", 1)]
    table = client_table(llm, blocks, [0, 1, 2], parts, devices=["server", "laptop", "phone"], context=16)
    assert table["block"].tolist() == [b.id for b in blocks]
    assert table["main_task"].tolist() == ["boolq", "asdiv", "asdiv"]
    assert table["sparse_mb"].iloc[0] == pytest.approx(table["dense_mb"].iloc[0])
    assert (np.diff(table["sparse_mb"]) < 0).all() and (np.diff(table["gflops_per_token"]) < 0).all()
    lin = table["linear_params"].iloc[0]
    np.testing.assert_allclose(table["kept_linear_params"] / lin, [1.0, 0.5, 0.25])


def test_task_mix_and_main_task():
    parts = [make_examples("boolq", 2) + make_examples("asdiv", 1), make_examples("asdiv", 3)]
    mix = task_mix(parts, ["boolq", "asdiv", "piqa"])
    assert mix.values.tolist() == [[2, 1, 0], [0, 3, 0]]
    assert main_task(make_examples("b", 1) + make_examples("a", 1)) == "a"  # ties: first by name
    with pytest.raises(LegokitError):
        main_task([])


def test_a_real_round_feeds_metrics_and_reaggregation(tiny_blocks, tmp_path):
    llm, tok, blocks = tiny_blocks
    cfg = _cfg()
    parts = [make_examples("boolq", 4), make_examples("asdiv", 4), make_examples("boolq", 2)]
    server = run_federation(cfg, llm, tok, blocks, parts, tmp_path, progress=False).strategy
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 3 * cfg.train.local_steps
    assert metrics.groupby("client")["step"].max().tolist() == [2, 2, 2]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[metrics["client"] == 1]["loss"].tolist() == lines[1]["losses"]
    # round 1 starts from B = 0, so "keep" and previous=None agree: reaggregate gives back the server's own
    # aggregate, whose rank-r_g SVD kept the energy the round recorded
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    name = server.modules[0]
    delta = reaggregate(server, server.last_results, [name], ["heteagg"])["heteagg"][name]
    kept = energy_by_rank(delta, [server.global_rank])[0]
    assert kept == pytest.approx(rounds[0]["energy_kept"][name], rel=1e-4)
    (factors, scaling) = server.broadcast.adapter_for(None)
    a, b = factors[name]
    rel = torch.linalg.vector_norm(scaling * (b @ a) - delta) / torch.linalg.vector_norm(delta)
    assert float(rel) ** 2 == pytest.approx(1 - kept, abs=1e-4)
    # the global update merged through each block's mask is the model block_model gives
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    for i, block in enumerate(blocks):
        with block_model(server, i) as m, torch.no_grad():
            want = m(ids).logits
        with apply_delta(materialize(block.model), block_update(server, i)) as m, torch.no_grad():
            got = m(ids).logits
        block.release()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, blocks[i].model(ids).logits.detach(), atol=1e-4)
        block.release()
    nll = [response_nll(llm, tok, parts[0], batch_size=bs) for bs in (1, 3)]
    assert nll[0] == pytest.approx(nll[1], rel=1e-4)  # padding does not change it
    # reference: one unpadded example at a time, -log p of each response token given everything before it
    total, count = 0.0, 0
    for ex in parts[0]:
        p, r = tokenize_example(ex, tok)
        with torch.no_grad():
            logp = torch.log_softmax(llm(torch.tensor([p + r])).logits[0].double(), -1)  # (T, V)
        total -= sum(float(logp[len(p) - 1 + t, r[t]]) for t in range(len(r)))
        count += len(r)
    assert nll[0] == pytest.approx(total / count, rel=1e-5)
    # the same quantity evaluate reports for choice tasks (client_scores takes it from there)
    choice = [Example(task="piqa", prompt=f"Pick one: {i}?", response="A", choices=("x", "y"), answer_index=0,
                      uid=f"c{i}") for i in range(3)]
    assert response_nll(llm, tok, choice) == pytest.approx(evaluate_examples(llm, tok, "piqa", choice)["nll"], rel=1e-4)
    with pytest.raises(LegokitError, match="metrics.jsonl"):
        read_metrics(tmp_path / "nowhere")


def test_module_explorer_draws_headless(tiny_blocks):
    from legokit.widgets import module_explorer

    server, results = _server_with_random_results(tiny_blocks)
    explorer = module_explorer(server, results, ["heteagg", "flora"])
    name = server.modules[1]  # k_proj, 32 x 64: ranks 1, 2, 4, ... 32
    fig = explorer.draw(name)
    (ax,) = fig.axes
    assert ax.get_title() == name
    ranks = [1, 2, 4, 8, 16, 32]
    deltas = reaggregate(server, results, [name], ["heteagg", "flora"])
    curves, marks = ax.lines[:2], ax.lines[2:]
    for line, agg in zip(curves, ("heteagg", "flora"), strict=True):
        assert line.get_label() == agg and list(line.get_xdata()) == ranks
        np.testing.assert_allclose(line.get_ydata(), energy_by_rank(deltas[agg][name], ranks), rtol=1e-6)
    # the client rank (2) and the global rank (3 clients x 2) as vertical lines
    assert [list(m.get_xdata()) for m in marks] == [[2, 2], [6, 6]]
    assert [t.get_text() for t in ax.texts] == ["client r=2", "r_g=6"]
    explorer.update(server.modules[2])  # redraws into the widget's output area without error


# The device editor (02) and the aggregator explorer (03): each draws what the analysis computes. Each redraw sets a
# new ``out.outputs`` tuple (headless too), so ``is`` tells a redraw from a kept picture.


def test_device_editor_gives_each_budget_the_densest_block_that_fits(tiny_blocks):
    llm, _, blocks = tiny_blocks
    costs = block_cost_table(llm, blocks, context=16)
    mb = costs["sparse_mb"].tolist()
    assert mb[0] > mb[1] > mb[2]  # denser blocks cost more
    # exactly each block's size, then just below the dense one (-> 50%), then far above everything (-> dense)
    budgets = [mb[2], mb[1], mb[0] - 0.01, 10 * mb[0]]
    table = blocks_for_budgets(costs, budgets, ["phone", "laptop", "workstation", "server"])
    assert table["block_index"].tolist() == [2, 1, 1, 0]
    assert table["block"].tolist() == [blocks[i].id for i in (2, 1, 1, 0)]
    np.testing.assert_allclose(table["sparse_mb"], [mb[2], mb[1], mb[1], mb[0]])
    np.testing.assert_allclose(table["headroom_mb"], np.array(budgets) - table["sparse_mb"])
    np.testing.assert_allclose(table["gflops_per_token"], costs["gflops_per_token"].to_numpy()[[2, 1, 1, 0]])

    editor = widgets.device_editor(llm, blocks, [mb[0], mb[2]], ["server", "phone"], context=16)
    assert "legokit-device-editor" in editor._dom_classes
    start = [c.value for c in editor.controls.values()]  # each block's size rounded up to the step (0.0001 MiB)
    assert all(0 <= v - m < 1e-4 + 1e-9 for v, m in zip(start, [mb[0], mb[2]], strict=True))
    assert editor.controls["client1"].description == "client 1 (phone), MiB"
    fig = editor.draw(client0=mb[1] + 0.01)  # headless: the picture for other budgets
    ax_mem, ax_flops, ax_tab = fig.axes
    heights = [p.get_height() for p in ax_mem.patches]
    assert heights[:2] == [mb[1] + 0.01, start[1]]  # the budgets, then the blocks they buy
    np.testing.assert_allclose(heights[2:], [mb[1], mb[2]])
    np.testing.assert_allclose([p.get_height() for p in ax_flops.patches], costs["gflops_per_token"][[1, 2]])
    cells = ax_tab.tables[0].get_celld()
    assert [cells[r, 3].get_text().get_text() for r in (1, 2)] == [blocks[1].id, blocks[2].id]


def test_device_editor_shows_an_impossible_budget_and_keeps_the_picture(tiny_blocks):
    llm, _, blocks = tiny_blocks
    costs = block_cost_table(llm, blocks)
    editor = widgets.device_editor(llm, blocks, costs["sparse_mb"].tolist())
    before = editor.out.outputs
    assert len(before) == 1  # the first picture, drawn on build
    message = editor.update(client1=0.1)
    smallest = costs["sparse_mb"].min()  # 0.1436... MiB
    assert message and "client 1" in message and "fits no block" in message
    assert blocks[-1].id in message and f"needs {smallest:.6g} MiB" in message and "at least 0.1437 MiB" in message
    assert "prune.sparsities" in message
    assert "legokit-error" in editor.status.value and "fits no block" in editor.status.value
    assert editor.out.outputs is before
    with pytest.raises(LegokitError, match="fits no block"):
        editor.draw(client1=0.1)
    assert editor.update(client1=0.1437) is None  # back in range: redrawn, the error gone
    assert editor.status.value == "" and editor.out.outputs is not before


# ----- aggregator explorer (03) ------------------------------------------------------------------------------
def test_aggregator_explorer_error_is_aggregation_errors(tiny_blocks):
    server, results = _server_with_random_results(tiny_blocks)
    explorer = widgets.aggregator_explorer(server, results)
    assert "legokit-aggregator-explorer" in explorer._dom_classes
    assert list(explorer.controls["aggregator"].options) == list(AGGREGATORS)
    name = server.modules[3]
    errors = aggregation_errors(server, results, names=[name], progress=False).set_index("aggregator")
    for agg in ("heteagg", "fedavg_delta", "flora"):
        fig = explorer.draw(agg, name)
        ax_delta, ax_ref, ax_diff, ax_cov = fig.axes[:4]
        assert fig._suptitle.get_text().startswith(f"{name} · {agg}: relative error "
                                                   f"{errors.loc[agg, 'rel_error']:.2e}")
        delta = reaggregate(server, results, [name], [agg])[agg][name]
        ref = owner_mean(client_updates(server, results, [name]), name)
        np.testing.assert_allclose(ax_delta.images[0].get_array(), delta[:48, :96].numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(ax_ref.images[0].get_array(), ref[:48, :96].numpy())
        np.testing.assert_allclose(ax_diff.images[0].get_array(), (delta.double() - ref)[:48, :96].numpy(),
                                   atol=1e-6)
        owners = sum(b.masks[name].int() for b in server.blocks)
        assert np.array_equal(ax_cov.images[0].get_array(), owners[:48, :96].numpy())
    assert errors.loc["heteagg", "rel_error"] < 1e-6  # HeteAgg is the owner mean
    assert errors.loc["fedavg_delta", "rel_error"] > 0.05  # dividing by every client dilutes


def test_aggregator_explorer_redraws_on_update(tiny_blocks, monkeypatch):
    server, results = _server_with_random_results(tiny_blocks)
    import legokit.viz

    titles = []
    plot = legokit.viz.plot_aggregator_detail
    monkeypatch.setattr(legokit.viz, "plot_aggregator_detail",
                        lambda *a, **kw: titles.append(a[3]) or plot(*a, **kw))
    explorer = widgets.aggregator_explorer(server, results, ["heteagg", "fedavg"], server.modules[:4])
    first = explorer.out.outputs
    assert titles[0].startswith(f"{server.modules[0]} · heteagg")  # the first picture, drawn on build
    assert explorer.update(aggregator="fedavg", module=server.modules[2]) is None
    assert explorer.out.outputs is not first and len(titles) == 2
    assert titles[-1].startswith(f"{server.modules[2]} · fedavg")
    assert (explorer.controls["aggregator"].value, explorer.controls["module"].value) == ("fedavg", server.modules[2])
    second = explorer.out.outputs
    message = explorer.update(module=server.modules[5])  # not offered: reported, nothing redrawn
    assert "is not one of the choices" in message and explorer.out.outputs is second and len(titles) == 2
