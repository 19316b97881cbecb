"""The privacy plots (03_aggregation): what HeteAgg exposes of a block mix (``privacy.exposure``)."""

from __future__ import annotations

import numpy as np

from legokit.viz.aggregation import _owner_colors
from legokit.viz.figure import panel_figure


def plot_exposure(ex: dict):
    """The exposure of a block mix (``legokit.privacy.exposure.exposure``): 2 axes.

    Left: per module kind (q_proj, ..., down_proj, over all layers), the share of its weights owned by exactly
    c clients, stacked (white = nobody). Right: per client, the share of all weights that only it owns, where
    HeteAgg's owner mean is its update as sent.
    """
    K = len(ex["clients"])
    kinds: dict[str, np.ndarray] = {}
    for name, m in ex["modules"].items():  # weight-weighted owner histogram per module kind
        kind = name.rsplit(".", 1)[-1]
        kinds[kind] = kinds.get(kind, np.zeros(K + 1)) + m["weights"] * np.asarray(m["owners"])
    labels = [*kinds, "all"]
    shares = np.array([v / v.sum() for v in kinds.values()] + [np.asarray(ex["owners"])])  # (kinds + 1, K + 1)
    cmap, _ = _owner_colors(K)
    fig, (ax, ax_sole) = panel_figure(2, width=4.6, height=0.35 * len(labels) + 1.6)
    left = np.zeros(len(labels))
    for c in range(K + 1):
        ax.barh(labels, shares[:, c], left=left, color=cmap(c), edgecolor="#888888", lw=0.3, label=str(c))
        left += shares[:, c]
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="share of the weights", title="weights owned by c clients")
    ax.legend(title="c", fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    sole = [100 * ex["sole"][c] for c in ex["clients"]]
    bars = ax_sole.barh(ex["clients"], sole, color="#c0504d")
    ax_sole.bar_label(bars, fmt="%.1f%%", fontsize=7, padding=2)
    ax_sole.invert_yaxis()
    ax_sole.set(xlabel="% of all weights only this client owns", xlim=(0, max(max(sole), 1.0) * 1.25),
                title="single-owner weights: the update sent as is")
    return fig
