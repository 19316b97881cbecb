"""The aggregation plots (03_aggregation): coverage maps, one aggregator against the exact owner mean, update
norms and similarities, aggregation errors, the SVD energy by rank, and the global LLM per aggregator."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap

from legokit.viz.figure import panel_figure, top_left


def plot_coverage_map(cov, title: str = "coverage", crop=(64, 128)):
    """Heatmap of how many clients own each coordinate of one module (``aggregate.coverage``).

    Args:
        cov: int (out, in) owner counts.
        crop: show only the top-left ``(rows, cols)`` so single weights stay visible (None: everything).
    Returns a Figure with 2 axes: the map and its colorbar (one colour per owner count 0..K).
    """
    K = max(int(cov.max()) if cov.numel() else 0, 1)
    cmap, norm = _owner_colors(K)
    full = tuple(cov.shape)
    if crop is not None:
        cov = cov[: crop[0], : crop[1]]
        if tuple(cov.shape) != full:
            title = f"{title}\n(top-left {cov.shape[0]} x {cov.shape[1]} of {full[0]} x {full[1]})"
    h, w = cov.shape
    fig, (ax,) = panel_figure(1, width=min(9.0, 2.5 + 4.5 * w / max(h, w)), height=3.6)
    im = ax.imshow(cov.cpu().numpy(), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set(xlabel="input coordinate", ylabel="output coordinate", title=title)
    ax.title.set_fontsize(9)
    fig.colorbar(im, ax=ax, ticks=list(range(K + 1)), label="clients owning it")
    return fig


def _owner_colors(K: int):
    """A colormap and norm with one colour per owner count 0..K (white = nobody owns it)."""
    import seaborn as sns  # heavy optional dependency, loaded when a plot needs it

    cmap = ListedColormap(["#ffffff"] + sns.color_palette("viridis", K))
    return cmap, BoundaryNorm([c - 0.5 for c in range(K + 2)], cmap.N)


def plot_aggregator_detail(delta, reference, cov, title: str | None = None, crop=(48, 96)):
    """One aggregator's ΔW_g beside the exact owner mean (``analysis.aggregator_detail``): 4 axes + colorbars.

    Panels, each the top-left ``crop`` (rows, cols) of the module: ΔW_g and the owner mean on one symmetric
    scale (red +, blue -), their difference on its own scale (so a round-off difference still shows), and how
    many clients own each weight.
    """
    d, ref, diff = top_left(delta, crop), top_left(reference, crop), top_left(delta.double() - reference.double(), crop)
    c = top_left(cov, crop)
    vmax = max(float(np.abs(d).max()), float(np.abs(ref).max())) or 1.0
    dmax = float(np.abs(diff).max()) or 1.0
    K = max(int(cov.max()) if cov.numel() else 0, 1)
    cmap, norm = _owner_colors(K)
    fig, axes = panel_figure(4, width=3.2, height=2.8)
    panels = [(d, "ΔW_g", dict(cmap="RdBu_r", vmin=-vmax, vmax=vmax)),
              (ref, "exact owner mean", dict(cmap="RdBu_r", vmin=-vmax, vmax=vmax)),
              (diff, f"ΔW_g − owner mean (max |·| {float(np.abs(diff).max()):.1e})",
               dict(cmap="RdBu_r", vmin=-dmax, vmax=dmax)),
              (c, "clients owning each weight", dict(cmap=cmap, norm=norm))]
    for ax, (a, label, style) in zip(axes, panels, strict=True):
        im = ax.imshow(a, aspect="auto", interpolation="nearest", **style)
        ax.set_title(label, fontsize=9)
        ax.set(xticks=[], yticks=[])
        fig.colorbar(im, ax=ax, shrink=0.8, **({"ticks": list(range(K + 1))} if style.get("norm") else {}))
    axes[0].set(ylabel=f"top-left {d.shape[0]} x {d.shape[1]} of {tuple(delta.shape)[0]} x {tuple(delta.shape)[1]}")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_layer_coverage(table):
    """Coverage per layer (``analysis.coverage_table``): 2 axes.

    Left: mean number of owners per coordinate, one line per module kind. Right: share of coordinates
    owned by exactly c clients (stacked, averaged over the layer's modules).
    """
    import seaborn as sns  # heavy optional dependency, loaded when a plot needs it

    fig, (ax_mean, ax_frac) = panel_figure(2, width=4.8)
    for kind, g in table.groupby("kind", sort=False):
        ax_mean.plot(g["layer"], g["mean_owners"], marker=".", label=kind)
    cols = [c for c in table.columns if c.startswith("owners_")]
    ax_mean.set(xlabel="layer", ylabel="mean owners per coordinate", title="mean coverage",
                ylim=(0, len(cols) - 0.5))
    ax_mean.legend(fontsize=7, ncol=2, loc="lower right")
    per_layer = table.groupby("layer")[cols].mean()
    colors = ["#ffffff"] + sns.color_palette("viridis", len(cols) - 1)
    ax_frac.stackplot(per_layer.index, per_layer.T.values, labels=[c.split("_")[1] for c in cols],
                      colors=colors, edgecolor="#888888", lw=0.3)
    ax_frac.set(xlabel="layer", ylabel="share of coordinates", ylim=(0, 1), title="owned by c clients")
    ax_frac.legend(title="c", fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def plot_update_norms(norms, round_norms=None):
    """Client update norms (``analysis.update_norm_table``): per layer, and per round if given.

    Args:
        norms: long table ``client, layer, norm`` (per module; summed in quadrature per layer).
        round_norms: optional table ``round, client, update_norm`` (the run's metrics.jsonl) for a
            second axis of bars per round.
    Returns a Figure with 1 axis, or 2 with ``round_norms``.
    """
    fig, axes = panel_figure(1 if round_norms is None else 2, width=4.8)
    per_layer = norms.assign(sq=norms["norm"] ** 2).groupby(["client", "layer"])["sq"].sum() ** 0.5
    for client, s in per_layer.groupby(level=0):
        axes[0].plot(s.index.get_level_values(1), s.values, marker=".", label=str(client))
    axes[0].set(xlabel="layer", ylabel="‖M_k ⊙ ΔW_k‖_F", title="update norm per layer (last round)")
    axes[0].legend(fontsize=7)
    if round_norms is not None:
        piv = round_norms.pivot(index="round", columns="client", values="update_norm")
        x = np.arange(len(piv.index))
        width = 0.8 / max(1, len(piv.columns))
        for j, c in enumerate(piv.columns):
            axes[1].bar(x + (j - (len(piv.columns) - 1) / 2) * width, piv[c], width, label=f"client {c}")
        axes[1].set(xticks=x, xlabel="round", ylabel="‖ΔW_k‖_F (all modules)", title="update norm per round")
        axes[1].set_xticklabels([str(r) for r in piv.index])
        axes[1].legend(fontsize=7)
    return fig


def plot_cosine_matrix(cos, labels, title: str = "cosine similarity of client updates"):
    """Heatmap of pairwise cosine similarities (``aggregate.cosine_matrix``): 2 axes (map, colorbar)."""
    fig, (ax,) = panel_figure(1, width=4.6, height=3.8)
    im = ax.imshow(cos.cpu().numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    n = len(labels)
    ax.set(xticks=range(n), yticks=range(n), title=title)
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(labels, fontsize=8)
    ax.title.set_fontsize(9)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{float(cos[i, j]):.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax)
    return fig


def plot_aggregation_errors(errors):
    """Each aggregator against the exact owner mean (``analysis.aggregation_errors``): 2 axes.

    Left: relative Frobenius error per layer (mean over the layer's modules, log scale). Right: dilution
    on partially owned coordinates (1 = the owners' mean; below 1 = pulled towards the pruned zeros).
    """
    fig, (ax_err, ax_dil) = panel_figure(2, width=5.0)
    aggs = list(dict.fromkeys(errors["aggregator"]))
    for a in aggs:
        g = errors[errors["aggregator"] == a].groupby("layer")["rel_error"].mean()
        ax_err.plot(g.index, np.maximum(g.values, 1e-9), marker=".", label=a)
    ax_err.set(yscale="log", xlabel="layer", ylabel="‖ΔW_a − owner mean‖ / ‖owner mean‖",
               title="error vs the exact owner mean")
    ax_err.legend(fontsize=7)
    dil = errors.groupby("aggregator", sort=False)["dilution"].mean().reindex(aggs)
    ax_dil.bar(range(len(aggs)), dil.values, color="#3b75af")
    ax_dil.axhline(1.0, ls="--", color="k", lw=1)
    ax_dil.set(xticks=range(len(aggs)), ylabel="⟨ΔW_a, ref⟩ / ‖ref‖² (partial coverage)",
               title="dilution by pruned zeros")
    ax_dil.set_xticklabels(aggs, rotation=30, ha="right", fontsize=8)
    for x, v in enumerate(dil.values):
        ax_dil.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=8)
    return fig


def plot_energy_by_rank(curves, ranks, marks=None):
    """Energy kept by a rank-r SVD vs r (``analysis.energy_by_rank``), one line per module: 1 axis.

    Args:
        curves: ``{label: energies}`` over ``ranks``.
        marks: ``{label: rank}`` vertical lines (e.g. the client rank and the default r_g).
    """
    fig, (ax,) = panel_figure(1, width=5.2, height=3.4)
    for label, e in curves.items():
        ax.plot(ranks, e, marker=".", label=label)
    for label, r in (marks or {}).items():
        ax.axvline(r, ls="--", color="grey", lw=1)
        ax.annotate(label, (r, 0.02), rotation=90, fontsize=8, ha="right", va="bottom",
                    xycoords=("data", "axes fraction"))
    ax.set(xscale="log", xlabel="rank r", ylabel="energy kept Σσ²(≤r) / Σσ²", ylim=(0, 1.02),
           title="SVD energy of the aggregate by rank")
    ax.legend(fontsize=7)
    return fig


def plot_aggregator_scores(scores):
    """The global LLM per aggregator: mean task score, held-out perplexity, and mean response NLL.

    Args:
        scores: one row per model with columns ``model``, ``mean_score``, ``perplexity`` and optionally
            ``response_nll``.
    Returns a Figure with 2 axes, or 3 with ``response_nll``.
    """
    panels = [("mean_score", "mean task score (%)", "task score", "#3b75af", 100.0),
              ("perplexity", "perplexity", "held-out perplexity", "#ef8636", 1.0)]
    if "response_nll" in scores:
        panels.append(("response_nll", "mean response NLL", "response NLL (scored examples)", "#55a868", 1.0))
    fig, axes = panel_figure(len(panels), width=4.2)
    x = list(range(len(scores)))
    for ax, (col, ylabel, title, color, scale) in zip(axes, panels, strict=True):
        vals = scale * scores[col].astype(float)
        ax.bar(x, vals, color=color)
        if col != "mean_score":  # zoom: the differences between aggregators are small
            lo, hi = float(vals.min()), float(vals.max())
            pad = hi - lo + 1e-3 * max(abs(hi), 1e-9)
            ax.set_ylim(lo - 0.6 * pad, hi + 0.3 * pad)
        ax.set(xticks=x, ylabel=ylabel, title=title)
        ax.set_xticklabels(scores["model"], rotation=30, ha="right", fontsize=8)
    return fig
