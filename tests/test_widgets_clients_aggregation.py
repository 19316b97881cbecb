"""The device editor (02) and the aggregator explorer (03) on tiny-llama: each draws what the analysis computes.

Each redraw sets a new ``out.outputs`` tuple (headless too), so ``is`` tells a redraw from a kept picture.
"""

import numpy as np
import pytest
import torch

from legokit import widgets
from legokit.aggregate import AGGREGATORS
from legokit.analysis import (
    aggregation_errors,
    block_cost_table,
    blocks_for_budgets,
    client_updates,
    owner_mean,
    reaggregate,
)
from legokit.blocks import extract_blocks
from legokit.config import ExperimentConfig
from legokit.models import linear_modules
from legokit.rounds import ClientResult
from legokit.strategy import build_strategy
from legokit.utils import LegokitError

CALIB = ["The quick brown fox jumps over the lazy dog. " * 4, "Paris is the capital of France. " * 4] * 2
SPARSITIES = (0.0, 0.5, 0.75)


@pytest.fixture(scope="module")
def tiny_blocks(tiny):
    """The module's shared tiny-llama (read-only) and its Wanda blocks at 0/50/75%."""
    llm, tok = tiny
    blocks = extract_blocks(llm, tok, sparsities=SPARSITIES, method="wanda", pattern="unstructured",
                            calibration="one_shot", n_calib=4, seq_len=32, seed=0, texts=CALIB)
    return llm, blocks


@pytest.fixture(scope="module")
def server_results(tiny_blocks):
    """A strategy over one client per block and hand-made results (random factors, sample counts 1, 2, 5)."""
    llm, blocks = tiny_blocks
    cfg = ExperimentConfig.from_dict({
        "model": "tiny-llama", "prune": {"sparsities": list(SPARSITIES), "n_calib": 4, "seq_len": 32},
        "lora": {"rank": 2, "alpha": 4.0},
        "fed": {"num_clients": 3, "rounds": 1, "client_sparsities": list(SPARSITIES)},
        "data": {"tasks": ["boolq", "asdiv"], "train_examples": 8}})
    server = build_strategy(cfg, llm, blocks, progress=False)
    gen = torch.Generator().manual_seed(0)
    results = [ClientResult(client=k, scaling=2.0, num_examples=n,
                            factors={name: (torch.randn(2, m.in_features, generator=gen),
                                            torch.randn(m.out_features, 2, generator=gen))
                                     for name, m in linear_modules(llm).items()})
               for k, n in enumerate((1, 2, 5))]
    return server, results


# ----- device editor (02) ------------------------------------------------------------------------------------
def test_device_editor_gives_each_budget_the_densest_block_that_fits(tiny_blocks):
    llm, blocks = tiny_blocks
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
    llm, blocks = tiny_blocks
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
def test_aggregator_explorer_error_is_aggregation_errors(server_results):
    server, results = server_results
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


def test_aggregator_explorer_redraws_on_update(server_results, monkeypatch):
    server, results = server_results
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
