"""The experiment plots (04_lego_experiment, 00_tour): keep-masks, sparsity per layer, weight updates, the
aggregate against a client, what the broadcast keeps, and the scores of conditions and blocks."""

from __future__ import annotations

import numpy as np
import pandas as pd

from legokit.names import THRESHOLDS
from legokit.viz.figure import panel_figure, top_left


def plot_mask(mask, title: str = "keep-mask", crop=(48, 96)):
    """One module's keep-mask (bool, out x in): 2 axes.

    Left: the share of rows that keep each input feature. Wanda scores |W_ij| x ‖X_j‖, so an input whose
    activations are large is kept in almost every row (spikes towards 100%) and a quiet one almost nowhere.
    Right: the individual weights of the top-left ``crop`` (dark = kept, white = pruned).
    """
    m = mask.detach().float().cpu()
    per_input = 100 * m.mean(0).numpy()  # (in,)
    pruned = 100 * (1 - float(m.mean()))
    fig, (ax_l, ax_c) = panel_figure(2, width=4.6, height=3.0)
    ax_l.plot(per_input, lw=0.6, color="#3b75af")
    ax_l.axhline(100 - pruned, ls="--", color="k", lw=0.8, label=f"overall: {100 - pruned:.0f}% kept")
    ax_l.set(xlabel="input feature j", ylabel="rows keeping it (%)", ylim=(0, 100), xlim=(0, len(per_input)),
             title=f"{title}: kept per input feature")
    ax_l.legend(fontsize=7, loc="lower right")
    ax_c.imshow(top_left(m, crop), cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax_c.set(xlabel="input feature j", ylabel="output feature i",
             title=f"top-left {crop[0]}x{crop[1]} weights ({pruned:.0f}% pruned)")
    for ax in (ax_l, ax_c):
        ax.title.set_fontsize(9)
    return fig


def plot_layer_sparsity(report):
    """Achieved sparsity per decoder layer, one line per module kind (``blocks.sparsity_report``): 1 axis."""
    fig, (ax,) = panel_figure(1, width=6.0, height=3.0)
    for kind, g in report.groupby("module", sort=False):
        ax.plot(g["layer"], 100 * g["sparsity"], marker=".", label=kind)
    ax.set(xlabel="decoder layer", ylabel="pruned (%)", ylim=(0, 100), title="sparsity per layer and module")
    ax.legend(fontsize=7, ncol=4, loc="lower center")
    return fig


def plot_delta_images(deltas, crop=(48, 96), title: str | None = None):
    """Weight updates side by side on one symmetric colour scale (red +, blue -, white 0): 1 axis each.

    Args:
        deltas: ``{label: tensor (out, in)}``, e.g. each client's ``M_k ⊙ ΔW_k`` and the aggregate.
        crop: show the top-left (rows, cols) so single weights are visible; None for the whole matrix.
    """
    arrays = {k: top_left(v, crop) for k, v in deltas.items()}
    vmax = max(float(np.abs(a).max()) for a in arrays.values()) or 1.0
    fig, axes = panel_figure(len(arrays), width=3.4, height=2.6)
    for ax, (label, a) in zip(axes, arrays.items(), strict=True):
        im = ax.imshow(a, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set(xticks=[], yticks=[])
    fig.colorbar(im, ax=axes, shrink=0.8, label="ΔW")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_aggregate_vs_client(client_delta, owners, aggregates, max_points: int = 6000, seed: int = 0):
    """Each coordinate's aggregate against one client's update, coloured by how many clients own it.

    Args:
        client_delta: the reference client's ``M_k ⊙ ΔW_k`` (out, in), e.g. the dense client's.
        owners: ``aggregate.coverage`` of the module (out, in): owners per coordinate.
        aggregates: ``{label: ΔW_g (out, in)}``, e.g. HeteAgg and the mask-agnostic average.
    Where only the reference client owns a coordinate, HeteAgg gives exactly its value (the diagonal);
    an average over all clients shrinks it towards the pruned clients' zeros.
    """
    x = client_delta.detach().float().cpu().reshape(-1).numpy()
    own = owners.detach().cpu().reshape(-1).numpy()
    rng = np.random.default_rng(seed)
    idx = rng.choice(x.size, size=min(max_points, x.size), replace=False)
    fig, axes = panel_figure(len(aggregates), width=3.6, height=3.3)
    lim = float(np.abs(x[idx]).max()) or 1.0
    for ax, (label, agg) in zip(axes, aggregates.items(), strict=True):
        y = agg.detach().float().cpu().reshape(-1).numpy()
        for c in sorted(set(own[idx].tolist()), reverse=True):  # fewest owners drawn last, on top
            sel = idx[own[idx] == c]
            ax.scatter(x[sel], y[sel], s=3, alpha=0.5, label=f"{c} owner{'s' if c != 1 else ''}")
        ax.plot([-lim, lim], [-lim, lim], ls="--", color="grey", lw=0.8)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="client's ΔW_k", ylabel="aggregate ΔW_g")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7, markerscale=3)
    return fig


def plot_energy_kept(rounds):
    """Share of ΔW_g's energy the rank-r_g broadcast keeps, per decoder layer, one line per round: 1 axis.

    Args:
        rounds: the dicts ``LegoStrategy.aggregate`` returns (``energy_kept``: {module: fraction}), or the run's
            ``rounds.jsonl`` rows.
    """
    fig, (ax,) = panel_figure(1, width=6.0, height=3.0)
    for r in rounds:
        e = pd.Series(r.get("energy_kept") or {}, dtype=float)
        if e.empty:
            continue
        layer = e.index.str.extract(r"\.(\d+)\.", expand=False).astype(int)
        per = e.groupby(layer.values).mean()
        ax.plot(per.index, 100 * per.values, marker=".", label=f"round {r['round']} (mean {100 * e.mean():.1f}%)")
    ax.set(xlabel="decoder layer", ylabel="energy kept (%)", ylim=(0, 101), title="what the broadcast keeps")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_before_after(scores):
    """Scores before and after the federation: 2 axes (task score, response NLL), bars per model and task.

    Args:
        scores: long table ``model, task, phase (before | after), score`` (the task's primary metric, 0-1),
            ``nll``.
    """
    import seaborn as sns  # heavy optional dependency, loaded when a plot needs it

    fig, axes = panel_figure(2, width=4.6, height=3.2)
    plot = scores.assign(label=scores["model"] + "\n" + scores["task"])
    for ax, metric, name in zip(axes, ("score", "nll"), ("score (%)", "response NLL (lower is better)"),
                                strict=True):
        data = plot.assign(value=100 * plot[metric] if metric == "score" else plot[metric])
        sns.barplot(data=data, x="label", y="value", hue="phase", ax=ax, errorbar=None)
        ax.set(xlabel="", ylabel=name)
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=8)
    return fig


def plot_condition_scores(table, tasks=None):
    """The global LLM of each condition (``claims.global_table``): 3 axes (per-task scores, mean score,
    held-out perplexity); error bars = std over seeds when the table holds several."""
    import seaborn as sns  # heavy optional dependency, loaded when a plot needs it

    tasks = list(tasks or [c for c in table.columns if c not in ("condition", "seed", "mean_score", "perplexity")])
    fig, (ax_t, ax_m, ax_p) = panel_figure(3, width=4.2, height=3.3)
    long = table.melt(id_vars=["condition", "seed"], value_vars=tasks, var_name="task", value_name="score")
    sns.barplot(data=long, x="task", y="score", hue="condition", errorbar="sd", capsize=0.1, ax=ax_t)
    ax_t.set(xlabel="", ylabel="score (points)", title="global LLM per task")
    ax_t.tick_params(axis="x", labelsize=7, rotation=20)
    ax_t.legend(fontsize=7)
    for ax, col, name in ((ax_m, "mean_score", "mean score (points)"), (ax_p, "perplexity", "held-out perplexity")):
        sns.barplot(data=table, x="condition", y=col, hue="condition", errorbar="sd", capsize=0.1, ax=ax,
                    legend=False)
        ax.set(xlabel="", ylabel=name, title=name)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    points, ppl = THRESHOLDS["c1_points"], THRESHOLDS["c3_ppl_relative"]
    means = table.groupby("condition")[["mean_score", "perplexity"]].mean()
    if "fedavg_dense" in means.index:  # C1: lego within 2 points of dense FedAvg (or 5% relative)
        ax_m.axhline(means.loc["fedavg_dense", "mean_score"] - points, ls="--", color="grey", lw=0.8,
                     label=f"fedavg_dense − {points:g} (C1)")
        ax_m.legend(fontsize=7, loc="lower right")
    lo, hi = float(table["perplexity"].min()), float(table["perplexity"].max())
    if "base" in means.index:  # C3: lego at most 5% above base
        limit = (1 + ppl) * means.loc["base", "perplexity"]
        ax_p.axhline(limit, ls="--", color="grey", lw=0.8, label=f"base + {ppl:.0%} (C3)")
        ax_p.legend(fontsize=7, loc="lower right")
        hi = max(hi, limit)
    ax_p.set_ylim(lo - 0.5 * (hi - lo + 0.1), hi + 0.3 * (hi - lo + 0.1))
    return fig


def plot_block_scores(table):
    """Each condition's blocks by sparsity (``claims.block_table``): 2 axes, own-task and other-task score
    against the block's sparsity, one line per condition; error bars = std over seeds (and clients)."""
    import seaborn as sns  # heavy optional dependency, loaded when a plot needs it

    fig, axes = panel_figure(2, width=4.6, height=3.3)
    for ax, col, name in zip(axes, ("own_task_score", "other_task_score"),
                             ("own task (trained on)", "other tasks (never seen)"), strict=True):
        sns.lineplot(data=table, x="sparsity", y=col, hue="condition", marker="o", errorbar="sd",
                     err_style="bars", ax=ax)
        ax.set(xlabel="block sparsity (%)", ylabel="score (points)", title=f"blocks on their {name}",
               xticks=sorted(table["sparsity"].unique()))
        ax.legend(fontsize=7)
    return fig
