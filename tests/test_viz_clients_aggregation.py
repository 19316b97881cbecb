"""The client (02) and aggregation (03) plots: each draws the numbers it is given.

Every test reads the drawn artists back (bar heights, line data, image arrays, annotation texts) and compares
them with the input table, so a plot that shows the wrong column, the wrong client or a stale value fails.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from legokit import viz

AGGS = ["heteagg", "fedavg", "fedavg_delta"]


def _heights(ax, start: int = 0, stop: int | None = None) -> list[float]:
    return [p.get_height() for p in ax.patches[start:stop]]


def _centers(ax, start: int = 0, stop: int | None = None) -> list[float]:
    return [p.get_x() + p.get_width() / 2 for p in ax.patches[start:stop]]


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _population() -> pd.DataFrame:
    return pd.DataFrame({"client": [0, 1, 2], "device": ["server", "laptop", "phone"],
                         "block": ["wanda-unstructured-0", "wanda-unstructured-50", "wanda-unstructured-75"],
                         "sparsity": [0.0, 0.5, 0.75], "dense_mb": [500.0] * 3, "sparse_mb": [500.0, 300.0, 200.0],
                         "gflops_per_token": [0.3, 0.2, 0.1], "dense_gflops_per_token": [0.3] * 3})


# ----- clients (02) --------------------------------------------------------------------------------------------
def test_client_population_bars_are_the_table():
    fig = viz.plot_client_population(_population())
    assert isinstance(fig, Figure)
    ax_mem, ax_flops = fig.axes
    assert _heights(ax_mem) == [500.0, 500.0, 500.0, 500.0, 300.0, 200.0]  # dense bars, then the SLMs
    np.testing.assert_allclose(_centers(ax_mem), [-0.2, 0.8, 1.8, 0.2, 1.2, 2.2])
    assert [t.get_text() for t in ax_mem.get_xticklabels()] == ["client 0\nserver", "client 1\nlaptop",
                                                                "client 2\nphone"]
    assert _heights(ax_flops) == [0.3, 0.2, 0.1]
    assert list(ax_flops.lines[0].get_ydata()) == [0.3, 0.3]  # the dense LLM's compute
    assert _texts(ax_flops) == ["0% pruned", "50% pruned", "75% pruned"]
    assert [t.xy for t in ax_flops.texts] == [(0, 0.3), (1, 0.2), (2, 0.1)]


def test_task_mix_stacks_each_clients_counts():
    mix = pd.DataFrame([[4, 0], [1, 3], [0, 2]], columns=["boolq", "asdiv"])
    (ax,) = viz.plot_task_mix(mix).axes
    assert _heights(ax) == [4, 1, 0, 0, 3, 2]  # boolq for clients 0..2, then asdiv on top of it
    assert [p.get_y() for p in ax.patches] == [0, 0, 0, 4, 1, 0]
    assert ax.get_title() == "task mix"
    ax_task, ax_dir = viz.plot_task_mix({"task": mix, "dirichlet": mix[::-1].reset_index(drop=True)}).axes
    assert (ax_task.get_title(), ax_dir.get_title()) == ("task", "dirichlet")
    assert _heights(ax_dir) == [0, 1, 4, 2, 3, 0]
    # one colour per task across panels
    assert ax_task.patches[0].get_facecolor() == ax_dir.patches[0].get_facecolor()
    assert ax_task.patches[0].get_facecolor() != ax_task.patches[3].get_facecolor()


def test_training_curves_plot_each_clients_losses_by_round():
    metrics = pd.DataFrame([{"round": r, "client": c, "block": f"b{c}", "step": s, "global_step": (r - 1) * 3 + s,
                             "loss": 2.0 - 0.1 * s - 0.5 * r + 0.01 * c} for r in (1, 2) for c in range(3)
                            for s in (1, 2, 3)])
    axes = viz.plot_training_curves(metrics).axes
    assert len(axes) == 3
    for c, ax in enumerate(axes):
        assert ax.get_title() == f"client {c}\nb{c}"
        round1, round2, start2 = ax.lines  # one line per round, a dashed mark where round 2 starts
        for line, r in ((round1, 1), (round2, 2)):
            want = metrics[(metrics["client"] == c) & (metrics["round"] == r)]
            assert list(line.get_xdata()) == list(want["global_step"])
            np.testing.assert_allclose(line.get_ydata(), want["loss"])
        assert list(start2.get_xdata()) == [3.5, 3.5]


def test_client_scores_bars_and_accuracy_labels():
    scores = pd.DataFrame([{"client": c, "block": f"b{c}", "task": t, "role": role, "phase": ph,
                            "nll": 1.0 + c + (0.5 if ph == "before" else 0.0),
                            "accuracy": 0.25 * (c + 1) if t == "boolq" and ph == "after" else float("nan")}
                           for c in range(3) for role, t in (("own", "asdiv"), ("other", "boolq"))
                           for ph in ("before", "after")])
    ax_own, ax_other = viz.plot_client_scores(scores).axes
    for ax in (ax_own, ax_other):
        assert _heights(ax) == [1.5, 2.5, 3.5, 1.0, 2.0, 3.0]  # before (grey) then after, clients 0..2
    assert _texts(ax_own) == []  # asdiv has no accuracy
    assert _texts(ax_other) == ["25%", "50%", "75%"]  # written on the "after" bars
    np.testing.assert_allclose([t.xy for t in ax_other.texts], [(0.2, 1.0), (1.2, 2.0), (2.2, 3.0)])
    assert [t.get_text() for t in ax_other.get_xticklabels()] == ["client 0\nboolq", "client 1\nboolq",
                                                                  "client 2\nboolq"]


# ----- aggregation (03) -------------------------------------------------------------------------------------
def test_coverage_map_shows_the_owner_counts():
    cov = torch.tensor([[3, 2, 1, 0], [3, 3, 1, 1]], dtype=torch.int32)
    fig = viz.plot_coverage_map(cov, "m")
    ax, bar = fig.axes  # the map and its colorbar
    np.testing.assert_array_equal(ax.images[0].get_array(), cov.numpy())
    assert ax.get_title() == "m" and list(bar.get_yticks()) == [0, 1, 2, 3]
    cropped = viz.plot_coverage_map(cov, "m", crop=(1, 2)).axes[0]
    np.testing.assert_array_equal(cropped.images[0].get_array(), [[3, 2]])
    assert cropped.get_title() == "m\n(top-left 1 x 2 of 2 x 4)"


@pytest.mark.parametrize("k", [1, 4])
def test_coverage_map_colorbar_has_one_tick_per_owner_count(k):
    cov = torch.randint(0, k + 1, (6, 9), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    cov[0, 0] = k
    fig = viz.plot_coverage_map(cov)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), cov.numpy())
    assert list(fig.axes[1].get_yticks()) == list(range(k + 1))


def test_layer_coverage_lines_and_stacked_shares():
    rows = []
    for layer in range(3):
        shares = np.array([0.0, 0.2 + 0.1 * layer, 0.3, 0.5 - 0.1 * layer])  # owners_0..3, sum 1
        for kind, bump in (("q_proj", 0.0), ("up_proj", 0.1)):
            rows.append({"module": f"l{layer}.{kind}", "layer": layer, "kind": kind,
                         "mean_owners": float(shares @ np.arange(4)) + bump,
                         **{f"owners_{c}": shares[c] for c in range(4)}})
    table = pd.DataFrame(rows)
    ax_mean, ax_frac = viz.plot_layer_coverage(table).axes
    for line, kind in zip(ax_mean.lines, ("q_proj", "up_proj"), strict=True):
        assert line.get_label() == kind and list(line.get_xdata()) == [0, 1, 2]
        np.testing.assert_allclose(line.get_ydata(), table[table["kind"] == kind]["mean_owners"])
    # stacked areas: band c spans [share of < c owners, share of <= c owners] at every layer
    cum = table.groupby("layer")[[f"owners_{c}" for c in range(4)]].mean().cumsum(axis=1).to_numpy()  # (3, 4)
    assert len(ax_frac.collections) == 4
    for c, band in enumerate(ax_frac.collections):
        verts = band.get_paths()[0].vertices
        for layer in range(3):
            ys = verts[np.isclose(verts[:, 0], layer), 1]
            assert np.isclose(ys.max(), cum[layer, c]) and np.isclose(ys.min(), cum[layer, c - 1] if c else 0)


def test_update_norms_sum_in_quadrature_per_layer_and_bars_per_round():
    norms = pd.DataFrame([{"client": f"client-{c}", "module": f"l{layer}.{kind}", "layer": layer, "kind": kind,
                           "norm": (1.0 + c + layer) if kind == "q" else 2.0}
                          for c in range(3) for layer in range(4) for kind in ("q", "k")])
    (ax,) = viz.plot_update_norms(norms).axes
    for c, line in enumerate(ax.lines):
        assert line.get_label() == f"client-{c}"
        np.testing.assert_allclose(line.get_ydata(), [np.hypot(1.0 + c + layer, 2.0) for layer in range(4)])
    rounds = pd.DataFrame([{"round": r, "client": c, "update_norm": 10 * r + c} for r in (1, 2) for c in range(3)])
    _, ax_rounds = viz.plot_update_norms(norms, rounds).axes
    assert _heights(ax_rounds) == [10, 20, 11, 21, 12, 22]  # client 0 in rounds 1, 2, then client 1, ...
    np.testing.assert_allclose(_centers(ax_rounds), [-0.8 / 3, 1 - 0.8 / 3, 0, 1, 0.8 / 3, 1 + 0.8 / 3])


def test_cosine_matrix_shows_the_matrix_and_its_values():
    cos = torch.tensor([[1.0, 0.2, -0.5], [0.2, 1.0, 0.0], [-0.5, 0.0, 1.0]])
    ax, _ = viz.plot_cosine_matrix(cos, ["a", "b", "c"]).axes
    np.testing.assert_allclose(ax.images[0].get_array(), cos.numpy())
    assert ax.images[0].get_clim() == (-1, 1)
    assert _texts(ax) == ["1.00", "0.20", "-0.50", "0.20", "1.00", "0.00", "-0.50", "0.00", "1.00"]


def test_aggregation_errors_lines_per_layer_and_dilution_bars():
    errors = pd.DataFrame([{"module": f"l{layer}.{kind}", "layer": layer, "kind": kind, "aggregator": a,
                            "rel_error": 0.1 * i * (1 + layer) + (0.02 if kind == "k" else 0.0),
                            "norm_ratio": 1.0, "dilution": 1.0 - 0.2 * i - (0.1 if kind == "k" else 0.0),
                            "partial_fraction": 0.75}
                           for layer in range(3) for kind in ("q", "k") for i, a in enumerate(AGGS)])
    ax_err, ax_dil = viz.plot_aggregation_errors(errors).axes
    for i, (line, a) in enumerate(zip(ax_err.lines, AGGS, strict=True)):
        assert line.get_label() == a
        want = [max(0.1 * i * (1 + layer) + 0.01, 1e-9) for layer in range(3)]  # mean over q and k
        np.testing.assert_allclose(line.get_ydata(), want)
    np.testing.assert_allclose(_heights(ax_dil), [0.95, 0.75, 0.55])  # mean dilution per aggregator
    assert _texts(ax_dil) == ["0.95", "0.75", "0.55"]
    assert [t.get_text() for t in ax_dil.get_xticklabels()] == AGGS


def test_energy_by_rank_curve_and_rank_marks():
    ranks = [1, 2, 4, 8]
    fig = viz.plot_energy_by_rank({"q": np.array([0.3, 0.5, 0.8, 1.0]), "v": np.array([0.6, 0.9, 1.0, 1.0])},
                                  ranks, {"r_g": 4})
    (ax,) = fig.axes
    q, v, mark = ax.lines
    assert list(q.get_xdata()) == ranks and list(q.get_ydata()) == [0.3, 0.5, 0.8, 1.0]
    assert list(v.get_ydata()) == [0.6, 0.9, 1.0, 1.0] and list(mark.get_xdata()) == [4, 4]
    assert _texts(ax) == ["r_g"]


def test_aggregator_scores_bars_in_points_and_zoomed_limits():
    scores = pd.DataFrame({"model": ["base"] + AGGS, "mean_score": [0.4, 0.5, 0.45, 0.42],
                           "perplexity": [20.0, 19.0, 19.5, 19.8]})
    ax_score, ax_ppl = viz.plot_aggregator_scores(scores).axes
    np.testing.assert_allclose(_heights(ax_score), [40.0, 50.0, 45.0, 42.0])  # percent
    assert _heights(ax_ppl) == [20.0, 19.0, 19.5, 19.8]
    pad = 1.0 + 1e-3 * 20.0  # zoomed to the spread: the differences between aggregators are small
    np.testing.assert_allclose(ax_ppl.get_ylim(), (19.0 - 0.6 * pad, 20.0 + 0.3 * pad))
    assert [t.get_text() for t in ax_ppl.get_xticklabels()] == ["base"] + AGGS
    axes = viz.plot_aggregator_scores(scores.assign(response_nll=[2.0, 1.9, 1.95, 1.97])).axes
    assert len(axes) == 3 and _heights(axes[2]) == [2.0, 1.9, 1.95, 1.97]
