"""The client (02) and aggregation (03) plots: each returns a Figure with the expected axes."""

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from legokit import viz

AGGS = ["heteagg", "fedavg", "fedavg_delta"]


def _population() -> pd.DataFrame:
    return pd.DataFrame({"client": [0, 1, 2], "device": ["server", "laptop", "phone"],
                         "block": ["wanda-unstructured-0", "wanda-unstructured-50", "wanda-unstructured-75"],
                         "sparsity": [0.0, 0.5, 0.75], "dense_mb": [500.0] * 3, "sparse_mb": [500.0, 300.0, 200.0],
                         "gflops_per_token": [0.3, 0.2, 0.1], "dense_gflops_per_token": [0.3] * 3})


def test_client_plots_have_their_axes():
    assert len(viz.plot_client_population(_population()).axes) == 2
    mix = pd.DataFrame([[4, 0], [1, 3], [0, 2]], columns=["boolq", "asdiv"])
    assert isinstance(viz.plot_task_mix(mix), Figure) and len(viz.plot_task_mix(mix).axes) == 1
    assert len(viz.plot_task_mix({"task": mix, "dirichlet": mix[::-1].reset_index(drop=True)}).axes) == 2
    metrics = pd.DataFrame([{"round": r, "client": c, "block": f"b{c}", "step": s, "global_step": (r - 1) * 3 + s,
                             "loss": 2.0 - 0.1 * s} for r in (1, 2) for c in range(3) for s in (1, 2, 3)])
    assert len(viz.plot_training_curves(metrics).axes) == 3
    scores = pd.DataFrame([{"client": c, "block": f"b{c}", "task": t, "role": role, "phase": ph,
                            "nll": 1.0 + c, "accuracy": 0.5 if t == "boolq" else float("nan")}
                           for c in range(3) for role, t in (("own", "asdiv"), ("other", "boolq"))
                           for ph in ("before", "after")])
    assert len(viz.plot_client_scores(scores).axes) == 2


def test_aggregation_plots_have_their_axes():
    cov = torch.tensor([[3, 2, 1, 0], [3, 3, 1, 1]], dtype=torch.int32)
    assert len(viz.plot_coverage_map(cov, "m").axes) == 2  # map + colorbar
    cropped = viz.plot_coverage_map(cov, "m", crop=(1, 2))
    assert cropped.axes[0].get_images()[0].get_array().shape == (1, 2) and "top-left" in cropped.axes[0].get_title()
    table = pd.DataFrame([{"module": f"l{l}.{k}", "layer": l, "kind": k, "mean_owners": 1.75, "owners_0": 0.0,
                           "owners_1": 0.25, "owners_2": 0.25, "owners_3": 0.5} for l in range(3)
                          for k in ("q_proj", "up_proj")])
    assert len(viz.plot_layer_coverage(table).axes) == 2
    norms = pd.DataFrame([{"client": f"client-{c}", "module": f"l{l}.q", "layer": l, "kind": "q", "norm": 1.0 + c}
                          for c in range(3) for l in range(4)])
    rounds = pd.DataFrame([{"round": r, "client": c, "update_norm": r + c} for r in (1, 2) for c in range(3)])
    assert len(viz.plot_update_norms(norms).axes) == 1
    assert len(viz.plot_update_norms(norms, rounds).axes) == 2
    cos = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
    assert len(viz.plot_cosine_matrix(cos, ["a", "b"]).axes) == 2
    errors = pd.DataFrame([{"module": f"l{l}", "layer": l, "kind": "q", "aggregator": a, "rel_error": 0.1 * i,
                            "norm_ratio": 1.0, "dilution": 1.0 - 0.2 * i, "partial_fraction": 0.75}
                           for l in range(3) for i, a in enumerate(AGGS)])
    assert len(viz.plot_aggregation_errors(errors).axes) == 2
    ranks = [1, 2, 4, 8]
    fig = viz.plot_energy_by_rank({"q": np.array([0.3, 0.5, 0.8, 1.0])}, ranks, {"r_g": 4})
    assert len(fig.axes) == 1
    scores = pd.DataFrame({"model": ["base"] + AGGS, "mean_score": [0.4, 0.5, 0.45, 0.42],
                           "perplexity": [20.0, 19.0, 19.5, 19.8]})
    assert len(viz.plot_aggregator_scores(scores).axes) == 2
    assert len(viz.plot_aggregator_scores(scores.assign(response_nll=[2.0, 1.9, 1.95, 1.97])).axes) == 3


@pytest.mark.parametrize("k", [1, 4])
def test_coverage_map_colorbar_has_one_tick_per_owner_count(k):
    cov = torch.randint(0, k + 1, (6, 9), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    cov[0, 0] = k
    fig = viz.plot_coverage_map(cov)
    assert len(fig.axes[1].get_yticks()) == k + 1
