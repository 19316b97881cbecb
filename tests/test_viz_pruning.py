"""The pruning (01) analyses, plots and explorers, on tiny-llama.

Analyses are checked against the pruning code they describe (``prune``'s scores, the blocks' own masks, the
output error measured on captured inputs); plots by reading their artists back; explorers headlessly.
"""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from legokit import analysis as A
from legokit import viz
from legokit.blocks import extract_blocks
from legokit.calibration import calibration_inputs, layerwise_calibration
from legokit.names import LORA_TARGETS
from legokit.prune import (
    magnitude_scores,
    method_scores,
    obs_scores,
    output_error,
    prune_mask,
    wanda_scores,
)
from legokit.utils import LegokitError

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 12, "Pack my box with five dozen liquor jugs. " * 12]
CALIB = {"n_calib": 4, "seq_len": 32, "seed": 0}
Q1 = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def pruned(tiny):
    """The tiny LLM, its calibration statistics, and blocks of every method made from the same windows."""
    llm, tok = tiny
    stats = A.calibration_stats(llm, tok, TEXTS, **CALIB)
    kw = {"texts": TEXTS, "progress": False, **CALIB}
    blocks = {m: extract_blocks(llm, tok, (0, 0.25, 0.5), method=m, **kw) for m in ("magnitude", "wanda", "sparsegpt")}
    blocks["structured"] = extract_blocks(llm, tok, (0.5,), method="wanda", pattern="structured", **kw)
    return llm, stats, blocks


# ----- prune primitives ------------------------------------------------------------------------------------------
def test_output_error_is_relative_and_ignores_the_hessian_scale():
    W = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])  # (out 2, in 3)
    X = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [2.0, 0.0, 1.0]])  # (tokens 4, in 3)
    H = X.T @ X
    pruned = W * torch.tensor([[True, True, False], [False, False, True]])
    want = float(torch.linalg.norm(X @ (W - pruned).T) / torch.linalg.norm(X @ W.T))
    assert output_error(W, pruned, H) == pytest.approx(want, rel=1e-6)
    assert output_error(W, pruned, 7.0 * H) == pytest.approx(want, rel=1e-6)
    assert output_error(W, W, H) == 0.0
    assert output_error(W, torch.zeros_like(W), H) == pytest.approx(1.0)
    with pytest.raises(LegokitError, match="shape"):
        output_error(W, W[:, :2], H)


def test_method_scores_dispatches_to_the_score_functions():
    gen = torch.Generator().manual_seed(0)
    W, X = torch.randn(3, 4, generator=gen), torch.randn(16, 4, generator=gen)
    norm, H = X.norm(dim=0), 2 * X.T @ X / 16
    assert torch.equal(method_scores("magnitude", W), magnitude_scores(W))
    assert torch.equal(method_scores("wanda", W, act_norm=norm), wanda_scores(W, norm))
    assert torch.equal(method_scores("sparsegpt", W, hessian=H), obs_scores(W, H))
    with pytest.raises(LegokitError, match="act_norm"):
        method_scores("wanda", W)
    with pytest.raises(LegokitError, match="unknown pruning method"):
        method_scores("random", W)


def test_layerwise_calibration_can_observe_a_subset_of_layers(tiny):
    llm, tok = tiny
    ids = calibration_inputs(tok, TEXTS, 2, 16)
    seen = []
    layerwise_calibration(llm, ids, lambda i, layer, st: seen.append((i, sorted(st.key_of))), layers=[1])
    assert [i for i, _ in seen] == [1] and all(".layers.1." in n for n in seen[0][1])
    with pytest.raises(LegokitError, match="subset of the decoder layers"):
        layerwise_calibration(llm, ids, lambda *a: None, layers=[2])


# ----- analyses ---------------------------------------------------------------------------------------------------
def test_calibration_stats_keep_what_the_hooks_saw(tiny, pruned):
    llm, tok = tiny
    _, stats, _ = pruned
    assert stats.layers == [0, 1] and len(stats.modules) == 14 and stats.tokens == 4 * 32
    q, k, v = (stats.hessians[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v  # one input, one Hessian
    # ||X_j||^2 is the diagonal of X^T X = H n / 2
    np.testing.assert_allclose(stats.act_norms[Q1] ** 2, torch.diag(q) * stats.tokens / 2, rtol=1e-4)
    only1 = A.calibration_stats(llm, tok, TEXTS, layers=[1], **CALIB)
    assert only1.layers == [1]
    torch.testing.assert_close(only1.hessians[Q1], q)
    with pytest.raises(LegokitError, match="not observed"):
        only1.check("model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_module_masks_are_the_blocks_masks(pruned, method):
    llm, stats, blocks = pruned
    for name in (Q1, "model.layers.0.mlp.down_proj"):
        m25, m50 = A.module_masks(llm, stats, name, method, [0.25, 0.5])
        assert torch.equal(m25, blocks[method][1].masks[name]) and torch.equal(m50, blocks[method][2].masks[name])
        assert not (m50 & ~m25).any()  # nested


def test_score_sample_is_prunes_score_at_the_sampled_weights(pruned):
    llm, stats, _ = pruned
    sample = A.score_sample(llm, stats, [1], n=50, sparsity=0.5)
    assert set(sample["kind"]) == set(LORA_TARGETS) and set(sample["layer"]) == {1}
    d = sample[sample["module"] == Q1]
    w = llm.get_submodule(Q1).weight
    want = {"magnitude": magnitude_scores(w), "wanda": wanda_scores(w, stats.act_norms[Q1]),
            "sparsegpt": obs_scores(w, stats.hessians[Q1])}
    for method, scores in want.items():
        g = d[d["method"] == method]
        assert len(g) == 50
        r, c = torch.tensor(g["row"].to_numpy()), torch.tensor(g["col"].to_numpy())
        np.testing.assert_allclose(g["score"], scores[r, c].numpy(), rtol=1e-6)
        assert (g["kept"].to_numpy() == prune_mask(scores, 0.5)[r, c].numpy()).all()
    # the same weights for every method
    pos = {m: list(zip(g["row"], g["col"], strict=True)) for m, g in d.groupby("method")}
    assert pos["magnitude"] == pos["wanda"] == pos["sparsegpt"]


def test_reconstruction_error_is_the_output_error_on_calibration_inputs(tiny, pruned):
    llm, tok = tiny
    _, stats, blocks = pruned
    errors = A.reconstruction_errors(blocks["wanda"], stats)
    mean = errors.groupby("block", sort=False)["rel_error"].mean()
    assert list(mean.index) == ["wanda-unstructured-0", "wanda-unstructured-25", "wanda-unstructured-50"]
    assert mean.iloc[0] == 0.0 and 0 < mean.iloc[1] < mean.iloc[2] < 1
    # against the module's real inputs, captured while the dense LLM reads the same windows
    name = "model.layers.1.mlp.down_proj"
    mod = llm.get_submodule(name)
    captured = []
    handle = mod.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach().flatten(0, -2)))
    with torch.no_grad():
        llm(input_ids=calibration_inputs(tok, TEXTS, **CALIB))
    handle.remove()
    X, W = torch.cat(captured), mod.weight.detach()
    M = blocks["wanda"][2].masks[name]
    want = float(torch.linalg.norm(X @ (W * ~M).T) / torch.linalg.norm(X @ W.T))
    got = errors[(errors["block"] == "wanda-unstructured-50") & (errors["module"] == name)]["rel_error"].item()
    assert got == pytest.approx(want, rel=1e-3)
    # SparseGPT reconstructs the kept weights to undo exactly this error
    sgpt = A.reconstruction_errors(blocks["sparsegpt"][2], stats)["rel_error"].mean()
    assert sgpt < mean.iloc[2]
    # a structured block: zero error exactly where it keeps everything (here every KV group, so k and v)
    sb = blocks["structured"][0]
    structured = A.reconstruction_errors(sb, stats)
    whole = {"k_proj", "v_proj"} if sb.sizes.kv_heads == llm.config.num_key_value_heads else set()
    assert set(structured.loc[structured["rel_error"] == 0, "kind"]) == whole


def test_kept_overlap_counts_shared_kept_weights(pruned):
    _, _, blocks = pruned
    mag, wanda = blocks["magnitude"][2], blocks["wanda"][2]
    same = A.kept_overlap(wanda, wanda)
    assert (same["overlap"] == 1.0).all() and np.allclose(same["chance"], 0.5)
    ov = A.kept_overlap(mag, wanda, [Q1])
    a, b = mag.masks[Q1], wanda.masks[Q1]
    assert ov["overlap"].item() == pytest.approx(float((a & b).sum() / a.sum()))
    assert 0.5 < ov["overlap"].item() < 1  # correlated scores, not the same ones
    with pytest.raises(LegokitError, match="no module"):
        A.kept_overlap(mag, wanda, ["lm_head"])


def test_mask_stats_on_a_small_mask():
    mask = torch.tensor([[True, False, True, False], [True, False, False, False]])
    lower = torch.tensor([[True, True, True, False], [True, False, True, False]])
    s = A.mask_stats(mask, lower)
    assert s["sparsity"] == pytest.approx(5 / 8)
    assert (s["row_sparsity_min"], s["row_sparsity_max"]) == (0.5, 0.75)
    assert (s["cols_fully_pruned"], s["rows_fully_pruned"]) == (0.5, 0.0)
    assert s["nested"] and s["violations"] == 0 and s["newly_pruned"] == pytest.approx(2 / 8)
    assert not A.mask_stats(lower, mask)["nested"]
    with pytest.raises(LegokitError, match="bool"):
        A.mask_stats(mask.float())


def test_structured_kept_reads_the_blocks_heads_and_channels(pruned):
    _, _, blocks = pruned
    sb = blocks["structured"][0]
    kept = A.structured_kept(sb)
    assert kept["heads"].shape == (2, 4) and kept["kv_heads"].shape == (2, 2) and kept["channels"].shape == (2, 128)
    assert (kept["heads"].sum(1) == sb.sizes.heads).all() and (kept["kv_heads"].sum(1) == sb.sizes.kv_heads).all()
    assert (kept["channels"].sum(1) == sb.sizes.channels).all()
    gate_rows = sb.index["model.layers.1.mlp.gate_proj"][0]
    assert np.flatnonzero(kept["channels"][1]).tolist() == sorted(gate_rows.tolist())
    with pytest.raises(LegokitError, match="not structured"):
        A.structured_kept(blocks["wanda"][2])


# ----- plots ------------------------------------------------------------------------------------------------------
def test_score_distributions_plot_one_axis_per_kind_and_a_scatter(pruned):
    llm, stats, blocks = pruned
    sample = A.score_sample(llm, stats, [0], n=200)
    overlap = A.kept_overlap(blocks["magnitude"][2], blocks["wanda"][2], stats.modules[:7])
    fig = viz.plot_score_distributions(sample, overlap)
    assert isinstance(fig, Figure) and len(fig.axes) == 8
    for ax, kind in zip(fig.axes[:7], LORA_TARGETS, strict=True):
        assert ax.get_title().startswith(kind)
        o = overlap.loc[overlap["kind"] == kind, "overlap"].item()
        assert f"wanda keeps {o:.0%} of magnitude's kept (chance 50%)" in ax.get_title()
        assert len(ax.patches) == 4  # one step histogram per method, and the ratio wanda / magnitude
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "magnitude", "wanda", "sparsegpt (√saliency)", "wanda ÷ magnitude = ‖X_j‖"]
    scatter = fig.axes[7]
    assert "Spearman" in scatter.get_title() and scatter.get_xscale() == "log"
    assert sum(len(c.get_offsets()) for c in scatter.collections) == 200  # every sampled down_proj weight


def test_reconstruction_heatmap_is_the_error_table(pruned):
    _, stats, blocks = pruned
    errors = A.reconstruction_errors([blocks["wanda"][2], blocks["sparsegpt"][2]], stats)
    fig = viz.plot_reconstruction_errors(errors)
    assert len(fig.axes) == 3  # two heatmaps and the colorbar
    for ax, block in zip(fig.axes[:2], ["wanda-unstructured-50", "sparsegpt-unstructured-50"], strict=True):
        assert ax.get_title() == block
        want = errors[errors["block"] == block].pivot(index="layer", columns="kind", values="rel_error")
        np.testing.assert_allclose(ax.images[0].get_array(), want[list(LORA_TARGETS)].to_numpy())
        assert [t.get_text() for t in ax.get_xticklabels()] == ["q", "k", "v", "o", "gate", "up", "down"]


def test_nm_picture_shows_two_of_every_four(pruned):
    llm, stats, _ = pruned
    mask = A.module_masks(llm, stats, Q1, "wanda", [None], "2:4")[0]
    assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()
    fig = viz.plot_nm_groups(mask, 4, crop=(4, 16))
    (ax,) = fig.axes
    shown = ax.images[0].get_array()
    assert shown.shape == (4, 16)
    assert (np.asarray(shown).reshape(4, 4, 4).sum(-1) == 2).all()
    assert sum(isinstance(p, Rectangle) for p in ax.patches) == 16  # every group outlined
    assert {t.get_text() for t in ax.texts} == {"2"} and "keeps 2 " in ax.get_title()
    with pytest.raises(LegokitError, match="groups of 3"):
        viz.plot_nm_groups(mask, 3)


def test_structured_picture_is_the_kept_arrays(pruned):
    _, _, blocks = pruned
    kept = A.structured_kept(blocks["structured"][0])
    ax_h, ax_c = viz.plot_structured_kept(kept).axes
    np.testing.assert_array_equal(ax_h.images[0].get_array(), kept["heads"])
    np.testing.assert_array_equal(ax_c.images[0].get_array(), kept["channels"])
    assert len(ax_h.lines) == 1  # the boundary between the 2 KV groups


def test_mask_nesting_picture_colours_each_weight(pruned):
    _, _, blocks = pruned
    m50, m25 = blocks["wanda"][2].masks[Q1], blocks["wanda"][1].masks[Q1]
    fig = viz.plot_mask_nesting(m50, m25, A.mask_stats(m50, m25), crop=(8, 16))
    ax_m, ax_n, ax_s = fig.axes
    np.testing.assert_array_equal(ax_m.images[0].get_array(), m50[:8, :16].numpy())
    state = np.asarray(ax_n.images[0].get_array())
    np.testing.assert_array_equal(state == 3, (m50 & m25)[:8, :16].numpy())  # kept by both
    np.testing.assert_array_equal(state == 2, (m25 & ~m50)[:8, :16].numpy())  # newly pruned
    assert not (state == 0).any()  # no violation
    assert "sparsity            50.0%" in ax_s.texts[0].get_text()


# ----- explorers --------------------------------------------------------------------------------------------------
def test_mask_explorer_draws_redraws_and_reports_bad_values(pruned):
    from legokit.widgets import mask_explorer

    llm, stats, blocks = pruned
    explorer = mask_explorer(llm, stats, module=Q1, sparsity=0.5)
    assert "legokit-mask-explorer" in explorer._dom_classes
    first = explorer.out.outputs
    assert len(first) == 1 and first[0]["output_type"] == "display_data"  # drawn on build
    fig = explorer.draw()
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), blocks["wanda"][2].masks[Q1][:32, :64].numpy())
    assert "nested in the 25% mask" in fig.axes[1].get_title()

    assert explorer.update(sparsity=0.25) is None and explorer.status.value == ""
    assert explorer.out.outputs is not first and len(explorer.out.outputs) == 1  # redrawn
    shown = explorer.out.outputs
    fig = explorer.draw(method="sparsegpt")
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(),
                                  blocks["sparsegpt"][1].masks[Q1][:32, :64].numpy())

    for bad, text in (({"sparsity": 1.5}, "outside its range"), ({"module": "nope"}, "not one of the choices"),
                      ({"pattern": "2:4"}, "contradicts pattern")):  # 2:4 prunes 50%, not 25%
        assert text in explorer.update(**bad)
        assert text in explorer.status.value and "legokit-error" in explorer.status.value
        assert explorer.out.outputs is shown  # the previous picture stays
    with pytest.raises(LegokitError, match="not in \\[0, 1\\)"):
        explorer.draw(sparsity=1.5)
    with pytest.raises(LegokitError, match="not observed"):
        explorer.draw(module="model.layers.9.mlp.up_proj")
    assert explorer.update(pattern="2:4", sparsity=0.5) is None and explorer.status.value == ""


def test_score_explorer_draws_one_layer(pruned):
    from legokit.widgets import score_explorer

    llm, stats, _ = pruned
    explorer = score_explorer(llm, stats, methods=("magnitude", "wanda"), n=100)
    assert "legokit-score-explorer" in explorer._dom_classes and len(explorer.out.outputs) == 1
    fig = explorer.draw(0)
    assert fig._suptitle.get_text() == "decoder layer 0" and len(fig.axes[0].patches) == 3


def test_a_widget_shows_a_figure_as_a_png_under_any_matplotlib_backend():
    """Outside an inline backend (``MPLBACKEND=Agg``, no ``%matplotlib inline``) no IPython formatter draws a
    figure; the widgets' redraw must still send a picture, not ``<Figure size ... with 1 Axes>``."""
    import base64

    from legokit.widgets.explorers import _display_output

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    out = _display_output(fig)
    assert base64.b64decode(out["data"]["image/png"]).startswith(b"\x89PNG")
