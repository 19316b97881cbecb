"""The client plots (02_clients): memory and compute per client, task mixes, training curves, before / after
scores, and what a memory budget buys."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from legokit.viz.figure import panel_figure


def _client_labels(table) -> list[str]:
    extra = table["device"] if "device" in table else table["block"]
    return [f"client {c}\n{e}" for c, e in zip(table["client"], extra, strict=True)]


def plot_client_population(table):
    """Memory and compute per client (``analysis.client_table``): 2 axes.

    Left: MiB of the dense LLM vs the client's SLM stored sparse. Right: GFLOPs per token of the SLM,
    the dense LLM's as a dashed line.
    """
    fig, (ax_mem, ax_flops) = panel_figure(2, width=4.8)
    x = np.arange(len(table))
    labels = _client_labels(table)
    ax_mem.bar(x - 0.2, table["dense_mb"], 0.4, label="dense LLM", color="#bbbbbb")
    ax_mem.bar(x + 0.2, table["sparse_mb"], 0.4, label="SLM, stored sparse", color="#3b75af")
    ax_mem.set(xticks=x, ylabel="MiB", title="memory per client", ylim=(0, 1.3 * float(table["dense_mb"].max())))
    ax_mem.set_xticklabels(labels, fontsize=8)
    ax_mem.legend(fontsize=8)
    ax_flops.bar(x, table["gflops_per_token"], 0.6, color="#ef8636")
    ax_flops.axhline(float(table["dense_gflops_per_token"].iloc[0]), ls="--", color="k", lw=1, label="dense LLM")
    for xi, (s, g) in enumerate(zip(table["sparsity"], table["gflops_per_token"], strict=True)):
        ax_flops.annotate(f"{s:.0%} pruned", (xi, g), ha="center", va="bottom", fontsize=8)
    ax_flops.set(xticks=x, ylabel="GFLOPs per token", title="forward compute per token")
    ax_flops.set_xticklabels(labels, fontsize=8)
    ax_flops.legend(fontsize=8, loc="lower left")
    return fig


def plot_task_mix(mixes, title: str | None = None):
    """Stacked bars of examples per task for each client; one axis per partition in ``mixes``.

    Args:
        mixes: a clients x tasks count DataFrame (``analysis.task_mix``), or ``{label: DataFrame}``.
    """
    import seaborn as sns  # heavy optional dependency, loaded when a plot needs it

    if isinstance(mixes, pd.DataFrame):
        mixes = {title or "task mix": mixes}
    tasks = list(dict.fromkeys(t for m in mixes.values() for t in m.columns))
    colors = dict(zip(tasks, sns.color_palette("tab10", len(tasks)), strict=True))
    fig, axes = panel_figure(len(mixes), width=3.8)
    for ax, (label, mix) in zip(axes, mixes.items(), strict=True):
        bottom = None
        for t in mix.columns:
            ax.bar(mix.index, mix[t], bottom=bottom, color=colors[t], label=t)
            bottom = mix[t] if bottom is None else bottom + mix[t]
        ax.set(xlabel="client", ylabel="examples", title=label, xticks=list(mix.index))
    handles, names = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, names, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def plot_training_curves(metrics):
    """Loss per local step of every client (``analysis.read_metrics``): one axis per client.

    Rounds follow each other on the x axis (``global_step``); dashed lines mark where a round starts
    from the new broadcast.
    """
    clients = sorted(metrics["client"].unique())
    fig, axes = panel_figure(len(clients), width=3.2, height=2.8)
    for ax, c in zip(axes, clients, strict=True):
        d = metrics[metrics["client"] == c]
        for rnd, g in d.groupby("round"):
            ax.plot(g["global_step"], g["loss"], marker="o", ms=3, label=f"round {rnd}")
            if rnd > 1:
                ax.axvline(g["global_step"].min() - 0.5, ls="--", color="grey", lw=0.8)
        ax.set(xlabel="local step", title=f"client {c}\n{d['block'].iloc[0]}")
        ax.title.set_fontsize(9)
    axes[0].set_ylabel("response loss")
    axes[-1].legend(fontsize=8)
    return fig


def plot_client_scores(scores):
    """Response NLL of each client's block before vs after the federation (``analysis.client_scores``).

    2 axes: the client's own task, and the other task. Accuracy (choice tasks) is written on the bars.
    """
    fig, axes = panel_figure(2, width=4.8)
    for ax, role in zip(axes, ("own", "other"), strict=True):
        d = scores[scores["role"] == role]
        clients = sorted(d["client"].unique())
        x = np.arange(len(clients))
        for off, phase, color in ((-0.2, "before", "#bbbbbb"), (0.2, "after", "#3b75af")):
            p = d[d["phase"] == phase].set_index("client").loc[clients]
            ax.bar(x + off, p["nll"], 0.4, color=color, label=phase)
            for xi, (nll, acc) in enumerate(zip(p["nll"], p["accuracy"], strict=True)):
                if not math.isnan(acc):
                    ax.annotate(f"{acc:.0%}", (xi + off, nll), ha="center", va="bottom", fontsize=7)
        tasks = d.drop_duplicates("client").set_index("client").loc[clients, "task"]
        ax.set(xticks=x, ylabel="response NLL (lower is better)", title=f"{role} task")
        ax.set_xticklabels([f"client {c}\n{t}" for c, t in zip(clients, tasks, strict=True)], fontsize=8)
        ax.legend(fontsize=8)
    return fig


def plot_budget_fit(table, costs):
    """What each client's memory budget buys (``analysis.blocks_for_budgets``): 3 axes.

    Top left: each client's budget (grey) beside the MiB of the block it gets (blue), with every extracted
    block's size as a dotted line. Top right: GFLOPs per token of that block, the dense LLM's dashed. Bottom:
    the same numbers as a table.

    Args:
        table: one row per client (``analysis.blocks_for_budgets``).
        costs: one row per block (``analysis.block_cost_table``), for the dotted size lines.
    """
    rows = 0.3 * (len(table) + 1)  # the table's height
    fig, axd = panel_figure(width=9.6, height=3.0 + rows, mosaic=[["mem", "flops"], ["table", "table"]],
                            height_ratios=[3.0, rows])
    ax_mem, ax_flops, ax_tab = axd["mem"], axd["flops"], axd["table"]
    x = np.arange(len(table))
    labels = _client_labels(table)
    ax_mem.bar(x - 0.2, table["budget_mb"], 0.4, label="budget", color="#dddddd", edgecolor="#888888")
    ax_mem.bar(x + 0.2, table["sparse_mb"], 0.4, label="its block, stored sparse", color="#3b75af")
    for xi, (s, mb) in enumerate(zip(table["sparsity"], table["sparse_mb"], strict=True)):
        ax_mem.annotate(f"{s:.0%}\npruned", (xi + 0.2, mb), ha="center", va="bottom", fontsize=7)
    for mb in costs["sparse_mb"]:
        ax_mem.axhline(mb, ls=":", color="#555555", lw=0.8)
    levels = ax_mem.secondary_yaxis("right")  # each block's size, labelled on the right edge
    levels.set_yticks(list(costs["sparse_mb"]), [f"{s:.0%} pruned" for s in costs["sparsity"]], fontsize=7)
    top = max(float(table["budget_mb"].max()), float(costs["sparse_mb"].max()))
    ax_mem.set(xticks=x, ylabel="MiB", title="memory budget and the block that fits", ylim=(0, 1.35 * top))
    ax_mem.set_xticklabels(labels, fontsize=8)
    ax_mem.legend(fontsize=7, loc="upper left", ncol=2)
    ax_flops.bar(x, table["gflops_per_token"], 0.6, color="#ef8636")
    ax_flops.axhline(float(costs["dense_gflops_per_token"].iloc[0]), ls="--", color="k", lw=1, label="dense LLM")
    ax_flops.set(xticks=x, ylabel="GFLOPs per token", title="forward compute per token")
    ax_flops.set_xticklabels(labels, fontsize=8)
    ax_flops.legend(fontsize=7, loc="lower left")
    cols = [c for c in ("client", "device", "budget_mb", "block", "sparse_mb", "headroom_mb", "gflops_per_token")
            if c in table]
    cells = [[f"{v:.3f}" if c == "gflops_per_token" else f"{v:.1f}" if isinstance(v, float) else str(v)
              for c, v in zip(cols, row, strict=True)] for row in table[cols].itertuples(index=False)]
    ax_tab.axis("off")
    tab = ax_tab.table(cellText=cells, colLabels=cols, loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.auto_set_column_width(list(range(len(cols))))
    return fig
