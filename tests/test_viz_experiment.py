"""The tour (00) and experiment (04) plots: the drawn artists hold the numbers they are given.

Masks and sparsity come from real tiny-llama blocks, so the plots are checked against what the blocks report.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import river_paragraphs

from legokit import viz
from legokit.aggregate import ClientUpdate, coverage, heteagg
from legokit.blocks import extract_blocks, sparsity_report

TEXTS = river_paragraphs(8)
KW = dict(n_calib=2, seq_len=32, texts=TEXTS, progress=False)


@pytest.fixture(scope="module")
def half(tiny):
    """Wanda blocks of the shared tiny-llama at 0% and 50%, unstructured."""
    llm, tok = tiny
    return extract_blocks(llm, tok, (0.0, 0.5), method="wanda", **KW)


def test_mask_plot_draws_the_mask_and_its_kept_share(half):
    name = "model.layers.0.mlp.up_proj"  # (128, 64)
    mask = half[1].masks[name]
    ax_share, ax_map = viz.plot_mask(mask, "up_proj", crop=(48, 32)).axes
    per_input, overall = ax_share.lines
    np.testing.assert_allclose(per_input.get_ydata(), 100 * mask.float().mean(0).numpy(), rtol=1e-6)
    rep = sparsity_report(half[1]).set_index("name")
    kept = 100 * (1 - rep.loc[name, "sparsity"])  # 50: Wanda is exact per row
    assert kept == pytest.approx(50.0)
    np.testing.assert_allclose(overall.get_ydata(), [kept, kept])
    np.testing.assert_array_equal(ax_map.images[0].get_array(), mask[:48, :32].float().numpy())
    assert ax_map.get_title() == "top-left 48x32 weights (50% pruned)"


def test_layer_sparsity_lines_are_the_sparsity_report(tiny):
    llm, tok = tiny
    block = extract_blocks(llm, tok, (0.5,), method="wanda", pattern="structured", **KW)[0]
    rep = sparsity_report(block)
    (ax,) = viz.plot_layer_sparsity(rep).axes
    kinds = list(dict.fromkeys(rep["module"]))
    assert [line.get_label() for line in ax.lines] == kinds
    for line, kind in zip(ax.lines, kinds, strict=True):
        rows = rep[rep["module"] == kind]
        assert list(line.get_xdata()) == list(rows["layer"])
        np.testing.assert_allclose(line.get_ydata(), 100 * rows["sparsity"])
    # structured pruning removes heads and channels: the kinds differ, so the lines are not all one number
    assert len({round(float(y), 6) for line in ax.lines for y in line.get_ydata()}) > 1


def test_delta_images_share_one_symmetric_scale():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 20, generator=g), 3 * torch.randn(10, 20, generator=g)
    fig = viz.plot_delta_images({"a": a, "b": b}, crop=(4, 6))
    ax_a, ax_b = fig.axes[:2]
    np.testing.assert_allclose(ax_a.images[0].get_array(), a[:4, :6].numpy())
    np.testing.assert_allclose(ax_b.images[0].get_array(), b[:4, :6].numpy())
    vmax = float(max(a[:4, :6].abs().max(), b[:4, :6].abs().max()))
    for ax in (ax_a, ax_b):
        assert ax.images[0].get_clim() == pytest.approx((-vmax, vmax))
    assert (ax_a.get_title(), ax_b.get_title()) == ("a", "b")


def test_aggregate_vs_client_scatter_places_every_coordinate(half):
    name = "model.layers.1.self_attn.q_proj"  # (64, 64)
    masks = [{name: half[0].masks[name]}, {name: half[1].masks[name]}]
    g = torch.Generator().manual_seed(1)
    deltas = [{name: torch.randn(64, 64, generator=g)} for _ in masks]
    # A = ΔW_k, B = I, scaling 1: s·B@A is ΔW_k bit for bit
    updates = [ClientUpdate(str(k), {name: (d[name], torch.eye(64))}, 1.0, m) for k, (d, m) in
               enumerate(zip(deltas, masks, strict=True))]
    agg = heteagg(updates)[name]
    owners = coverage(masks, name)
    client = deltas[0][name]  # the dense client owns everything
    (ax,) = viz.plot_aggregate_vs_client(client, owners, {"heteagg": agg}, max_points=500).axes
    labels = [c.get_label() for c in ax.collections]
    assert labels == ["2 owners", "1 owner"]  # fewest owners drawn last
    x, y, own = client.reshape(-1).numpy(), agg.reshape(-1).numpy(), owners.reshape(-1).numpy()
    drawn = 0
    for coll, count in zip(ax.collections, (2, 1), strict=True):
        pts = coll.get_offsets()
        drawn += len(pts)
        idx = [int(np.flatnonzero((x == px) & (y == py))[0]) for px, py in pts]  # each point is a coordinate
        assert (own[idx] == count).all()
        if count == 1:  # only the client owns it: HeteAgg gives its own value, on the diagonal
            np.testing.assert_array_equal(pts[:, 0], pts[:, 1])
    assert drawn == 500


def test_energy_kept_per_layer_and_round():
    rounds = [{"round": 1, "energy_kept": {"model.layers.0.q": 0.9, "model.layers.0.k": 0.7,
                                           "model.layers.1.q": 0.5}},
              {"round": 2, "energy_kept": {}},  # a round without survivors draws nothing
              {"round": 3, "energy_kept": {"model.layers.0.q": 1.0, "model.layers.1.q": 0.6}}]
    (ax,) = viz.plot_energy_kept(rounds).axes
    first, third = ax.lines
    assert list(first.get_xdata()) == [0, 1] and list(third.get_xdata()) == [0, 1]
    np.testing.assert_allclose(first.get_ydata(), [80.0, 50.0])  # layer 0 averages q and k
    np.testing.assert_allclose(third.get_ydata(), [100.0, 60.0])
    assert [first.get_label(), third.get_label()] == ["round 1 (mean 70.0%)", "round 3 (mean 80.0%)"]


def test_before_after_bars_are_the_scores():
    rows = [("boolq", "before", 0.5, 2.0), ("boolq", "after", 0.7, 1.5), ("piqa", "before", 0.4, 2.5),
            ("piqa", "after", 0.6, 1.8)]
    scores = pd.DataFrame([{"model": "lego", "task": t, "phase": ph, "score": s, "nll": n} for t, ph, s, n in rows])
    ax_score, ax_nll = viz.plot_before_after(scores).axes

    def bars(ax) -> dict:  # (x centre, height) of each drawn bar (seaborn adds empty legend patches)
        return {round(p.get_x() + p.get_width() / 2, 3): p.get_height() for p in ax.patches if p.get_width() > 0}

    assert [t.get_text() for t in ax_score.get_xticklabels()] == ["lego\nboolq", "lego\npiqa"]
    assert bars(ax_score) == {-0.2: 50.0, 0.8: 40.0, 0.2: 70.0, 1.2: 60.0}  # before left, after right; percent
    assert bars(ax_nll) == {-0.2: 2.0, 0.8: 2.5, 0.2: 1.5, 1.2: 1.8}


def test_condition_scores_show_means_over_seeds_and_claim_lines():
    table = pd.DataFrame([{"condition": c, "seed": s, "boolq": b + s, "mean_score": m + s, "perplexity": p}
                          for c, b, m, p in [("base", 40, 40, 20.0), ("fedavg_dense", 60, 61, 19.0),
                                             ("lego", 58, 60, 20.5)] for s in (0, 2)])
    ax_t, ax_m, ax_p = viz.plot_condition_scores(table, tasks=["boolq"]).axes
    assert [t.get_text() for t in ax_m.get_xticklabels()] == ["base", "fedavg_dense", "lego"]
    assert [p.get_height() for p in ax_m.patches] == [41.0, 62.0, 61.0]  # means over the two seeds
    assert [p.get_height() for p in ax_p.patches] == [20.0, 19.0, 20.5]
    assert [p.get_height() for p in ax_t.patches if p.get_width() > 0] == [41.0, 61.0, 59.0]  # hue order
    c1 = next(line for line in ax_m.lines if line.get_label().endswith("(C1)"))
    assert list(c1.get_ydata()) == [60.0, 60.0]  # fedavg_dense - 2 points
    c3 = next(line for line in ax_p.lines if line.get_label().endswith("(C3)"))
    np.testing.assert_allclose(c3.get_ydata(), [21.0, 21.0])  # base + 5%


def test_block_scores_lines_are_means_per_sparsity():
    table = pd.DataFrame([{"condition": c, "seed": s, "client": k, "sparsity": sp, "own_task_score": o + s,
                           "other_task_score": o / 2}
                          for c, o in (("lego", 60.0), ("local", 70.0)) for s in (0, 2)
                          for k, sp in ((0, 0), (1, 50))])
    ax_own, ax_other = viz.plot_block_scores(table).axes
    # seaborn draws each condition's means as an unlabelled line; its empty legend proxy has the same colour
    data = [line for line in ax_own.lines if line.get_label().startswith("_child")]
    proxies = {line.get_label(): line.get_color() for line in ax_own.lines if line.get_label() in ("lego", "local")}
    lines = {cond: next(line for line in data if line.get_color() == color) for cond, color in proxies.items()}
    np.testing.assert_allclose(lines["lego"].get_ydata(), [61.0, 61.0])
    np.testing.assert_allclose(lines["local"].get_ydata(), [71.0, 71.0])
    assert list(lines["lego"].get_xdata()) == [0, 50]
