"""Every plot the notebooks show (matplotlib / seaborn). Each function takes data, returns a Figure.

Sections by notebook, then the sweep summary (``legokit sweep`` writes it); nothing in the core modules imports
this file.
"""

from __future__ import annotations

import matplotlib

matplotlib.use(matplotlib.get_backend())  # keep the caller's backend (inline in Jupyter, Agg headless)

# ===================================================================== pruning (01_pruning)


_METHOD_COLORS = {"magnitude": "#7f7f7f", "wanda": "#3b75af", "sparsegpt": "#ef8636"}


def plot_score_distributions(sample, overlap=None, pair=("magnitude", "wanda"), scatter_kind: str = "down_proj"):
    """Each method's scores per module kind (``analysis.score_sample``): 8 axes.

    Axes 1-7 (q ... down_proj): the density (log scale, so the tails show) of log10(score / the method's
    median score in that kind), one line per method, so methods of different units share an x axis: a wider
    curve ranks weights more unevenly (SparseGPT's squared saliency is drawn as its square root, which ranks
    the same); dashed, the ratio of the ``pair`` scores of each weight (Wanda / magnitude is the input norm
    ‖X_j‖: its spread is what reorders the weights). Titles give the share of ``pair[0]``'s kept weights that
    ``pair[1]`` keeps too (``overlap``:
    ``analysis.kept_overlap``, mean over its layers) against chance. Axis 8: the two methods' scores of the
    same sampled weights of ``scatter_kind``, coloured by which method keeps them, with the Spearman rank
    correlation in the title.
    """
    import numpy as np
    from matplotlib.lines import Line2D

    from legokit.names import LORA_TARGETS

    methods = list(dict.fromkeys(sample["method"]))
    fig, axes = _panel_figure(4, width=3.3, height=2.7, nrows=2)
    a, b = pair
    def rel(x):  # log10(x / median), zeros at -4
        med = np.median(x[x > 0]) if (x > 0).any() else 1.0
        return np.log10(np.clip(x / med, 1e-4, None))

    for ax, kind in zip(axes, LORA_TARGETS, strict=False):
        wide = sample[sample["kind"] == kind].pivot_table(index=["module", "row", "col"], columns="method",
                                                          values="score", aggfunc="first")  # one row per weight
        curves = {}
        for method in methods:
            s = wide[method].to_numpy(dtype=float)
            if method == "sparsegpt":  # its saliency is squared (w^2 / d^2): the root ranks alike, in |W|'s units
                s = np.sqrt(s)
            curves["sparsegpt (√saliency)" if method == "sparsegpt" else method] = (rel(s), method, "-")
        if a in wide and b in wide:  # what b multiplies a by (Wanda / magnitude = the input norm ‖X_j‖)
            sa, sb = wide[a].to_numpy(dtype=float), wide[b].to_numpy(dtype=float)
            ratio = sb[sa > 0] / sa[sa > 0]
            curves[f"{b} ÷ {a}" + (" = ‖X_j‖" if (a, b) == ("magnitude", "wanda") else "")] = (rel(ratio), None, "--")
        top = max([1.0] + [float(r.max()) for r, _, _ in curves.values() if r.size])
        bins = np.linspace(-4, np.ceil(top), 60)
        for label, (r, method, ls) in curves.items():
            ax.hist(r, bins=bins, density=True, histtype="step", lw=1.2, log=True, ls=ls,
                    color=_METHOD_COLORS.get(method, "black"), label=label)
        title = kind
        if overlap is not None:
            o = overlap[overlap["kind"] == kind]
            title += f"\n{b} keeps {o['overlap'].mean():.0%} of {a}'s kept (chance {o['chance'].mean():.0%})"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("log10(score / median)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("density (log scale)", fontsize=8)
    axes[4].set_ylabel("density (log scale)", fontsize=8)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncol=4, fontsize=8)
    ax = axes[7]
    d = sample[sample["kind"] == scatter_kind]
    wide = d.pivot_table(index=["module", "row", "col"], columns="method", values=["score", "kept"],
                         aggfunc="first")
    xa, xb = wide["score"][a].to_numpy(float), wide["score"][b].to_numpy(float)
    ka, kb = wide["kept"][a].astype(bool).to_numpy(), wide["kept"][b].astype(bool).to_numpy()
    groups = [("kept by both", ka & kb, "#333333"), (f"only {a}", ka & ~kb, "#d62728"),
              (f"only {b}", ~ka & kb, "#1f77b4"), ("pruned by both", ~ka & ~kb, "#dddddd")]
    pos = np.concatenate([xa[xa > 0], xb[xb > 0]])
    floor = float(np.percentile(pos, 0.1)) if pos.size else 1e-12  # zeros and the rare tiny score sit on the edge
    for label, sel, color in groups:
        ax.scatter(np.maximum(xa[sel], floor), np.maximum(xb[sel], floor), s=2, color=color, label=label,
                   rasterized=True)
    rho = float(np.corrcoef(np.argsort(np.argsort(xa)), np.argsort(np.argsort(xb)))[0, 1]) if len(xa) > 1 else np.nan
    ax.set(xscale="log", yscale="log")
    ax.set_xlabel(f"{a} score", fontsize=8)
    ax.set_ylabel(f"{b} score", fontsize=8)
    ax.set_title(f"{scatter_kind}: same weights, Spearman ρ = {rho:.2f}", fontsize=8)
    ax.tick_params(labelsize=7)
    handles = [Line2D([], [], marker="o", ls="", color=c, ms=4, label=lab) for lab, _, c in groups]
    ax.legend(handles=handles, fontsize=6, loc="lower right")
    return fig


def plot_reconstruction_errors(errors):
    """Relative output error of every module, layers x module kinds (``analysis.reconstruction_errors``).

    One heatmap per block on one shared colour scale (dark = the pruned layer reproduces its dense output,
    bright = it does not), each cell written out, and a colorbar: ``blocks + 1`` axes.
    """
    import numpy as np

    from legokit.names import LORA_TARGETS

    blocks = list(dict.fromkeys(errors["block"])) if "block" in errors else [None]
    tables = {}
    for b in blocks:
        d = errors if b is None else errors[errors["block"] == b]
        tables[b] = d.pivot_table(index="layer", columns="kind", values="rel_error").reindex(
            columns=[k for k in LORA_TARGETS if k in set(d["kind"])])
    vmax = max(float(np.nanmax(t.to_numpy())) for t in tables.values()) or 1.0
    rows = max(len(t) for t in tables.values())
    fig, axes = _panel_figure(len(blocks), width=3.6, height=1.2 + 0.22 * rows)
    for ax, (b, t) in zip(axes, tables.items(), strict=True):
        im = ax.imshow(t.to_numpy(), cmap="magma", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(t.columns)), [c.removesuffix("_proj") for c in t.columns], fontsize=7)
        ax.set_yticks(range(len(t.index)), [str(i) for i in t.index], fontsize=7)
        ax.set(xlabel="module", ylabel="decoder layer")
        ax.set_title(b or "reconstruction error", fontsize=9)
        if rows <= 16:
            for i in range(t.shape[0]):
                for j in range(t.shape[1]):
                    v = t.iat[i, j]
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 * vmax else "white")
    fig.colorbar(im, ax=axes, shrink=0.8, label="‖XWᵀ − XW′ᵀ‖ / ‖XWᵀ‖")
    return fig


def plot_nm_groups(mask, m: int = 4, crop=(8, 32), title: str = "N:M mask"):
    """A corner of an N:M keep-mask with every group of ``m`` consecutive inputs outlined: 1 axis.

    Dark = kept, white = pruned; the number of kept weights is written in each group (crop permitting), and
    the title gives the range of kept counts over the whole mask (one number when every group agrees).
    """
    import numpy as np
    from matplotlib.patches import Rectangle

    from legokit.utils import LegokitError

    full = mask.detach().cpu()
    out_f, in_f = full.shape
    if in_f % m:
        raise LegokitError(f"the mask's {in_f} inputs do not split into groups of {m}")
    per_group = full.reshape(out_f, in_f // m, m).sum(-1)  # (out, in/m) kept per group
    lo, hi = int(per_group.min()), int(per_group.max())
    a = _crop(full, crop)
    a = a[:, : a.shape[1] - a.shape[1] % m]  # whole groups only
    h, w = a.shape
    fig, (ax,) = _panel_figure(1, width=min(10.0, 1.5 + 0.3 * w), height=1.2 + 0.32 * h)
    ax.imshow(a, cmap="Greys", vmin=0, vmax=1, aspect="equal", interpolation="nearest")
    for i in range(h):
        for g in range(w // m):
            ax.add_patch(Rectangle((g * m - 0.5, i - 0.5), m, 1, fill=False, ec="#ef8636", lw=1.2))
            if h * w <= 2048:
                ax.text(g * m + (m - 1) / 2, i, str(int(np.sum(a[i, g * m:(g + 1) * m]))), ha="center",
                        va="center", fontsize=7, color="black",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "#ef8636", "lw": 0.8})
    kept = f"{lo}" if lo == hi else f"{lo}-{hi}"
    ax.set_title(f"{title}: top-left {h} x {w}; every group of {m} keeps {kept} "
                 f"({per_group.numel()} groups in all)", fontsize=9)
    ax.set(xlabel="input feature j", ylabel="output row i")
    return fig


def plot_structured_kept(kept, title: str = "structured block"):
    """What a structured block keeps in each decoder layer (``analysis.structured_kept``): 2 axes.

    Left: layers x attention heads (dark = kept), KV groups separated by lines (GQA keeps a group's query
    heads with their key/value head). Right: layers x MLP channels; every layer keeps the same number, but
    not the same channels.
    """
    heads, kv, ch = kept["heads"], kept["kv_heads"], kept["channels"]
    layers, n_heads = heads.shape
    fig, (ax_h, ax_c) = _panel_figure(2, width=4.8, height=1.4 + 0.09 * layers)
    ax_h.imshow(heads, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    per_group = n_heads // kv.shape[1]
    for g in range(1, kv.shape[1]):
        ax_h.axvline(g * per_group - 0.5, color="#ef8636", lw=1.5)
    ax_h.set(xlabel=f"attention head ({kv.shape[1]} KV groups of {per_group})", ylabel="decoder layer",
             xticks=range(n_heads))
    ax_h.set_title(f"{title}: heads kept ({int(heads[0].sum())} of {n_heads} per layer)", fontsize=9)
    ax_c.imshow(ch, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax_c.set(xlabel="MLP channel", ylabel="decoder layer")
    ax_c.set_title(f"MLP channels kept ({int(ch[0].sum())} of {ch.shape[1]} per layer, "
                   f"{ch[0].mean():.0%})", fontsize=9)
    return fig


def plot_mask_nesting(mask, lower, stats: dict, title: str = "keep-mask", lower_label: str = "lower level",
                      crop=(32, 64)):
    """One keep-mask, its nesting in a lower-sparsity mask, and its statistics (``analysis.mask_stats``): 3 axes.

    Left: the top-left ``crop`` of the mask (dark = kept). Middle: the same corner against ``lower``: kept by
    both, newly pruned at this level, pruned already, and (red, should never appear) kept here but pruned
    there. Right: the numbers.
    """
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    m, lo = _crop(mask, crop).astype(bool), _crop(lower, crop).astype(bool)
    state = np.where(m & lo, 3, np.where(lo & ~m, 2, np.where(m & ~lo, 0, 1)))  # 0 violation .. 3 kept by both
    colors = ["#d62728", "#f0f0f0", "#ef8636", "#1f3b73"]
    labels = ["kept here, pruned below (violation)", "pruned at both", "newly pruned here", "kept at both"]
    fig, (ax_m, ax_n, ax_s) = _panel_figure(3, width=3.6, height=3.0)
    ax_m.imshow(m, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax_m.set(xlabel="input feature j", ylabel="output row i")
    ax_m.set_title(f"{title}\ntop-left {m.shape[0]} x {m.shape[1]}", fontsize=8)
    ax_n.imshow(state, cmap=ListedColormap(colors), vmin=-0.5, vmax=3.5, aspect="auto", interpolation="nearest")
    ax_n.set(xlabel="input feature j")
    ax_n.set_title(f"nested in {lower_label}?", fontsize=8)
    shown = [1, 2, 3] + ([0] if (state == 0).any() else [])
    ax_s.legend(handles=[Patch(color=colors[i], label=labels[i]) for i in shown], fontsize=7, loc="lower left",
                title="middle panel", title_fontsize=7)
    lines = [f"sparsity            {stats['sparsity']:.1%}",
             f"row sparsity, min   {stats['row_sparsity_min']:.1%}",
             f"row sparsity, max   {stats['row_sparsity_max']:.1%}",
             f"inputs all pruned   {stats['cols_fully_pruned']:.1%}",
             f"outputs all pruned  {stats['rows_fully_pruned']:.1%}"]
    if "nested" in stats:
        lines += [f"newly pruned        {stats['newly_pruned']:.1%}",
                  f"nested in lower     {'yes' if stats['nested'] else 'NO'} ({stats['violations']} violations)"]
    ax_s.axis("off")
    ax_s.text(0.0, 1.0, "\n".join(lines), family="monospace", fontsize=8, va="top", transform=ax_s.transAxes)
    ax_s.set_title("statistics (whole matrix)", fontsize=8)
    return fig

# ===================================================================== clients (02_clients)


def _panel_figure(ncols: int, width: float = 4.4, height: float = 3.2, nrows: int = 1):
    """A Figure (not registered with pyplot, so a notebook shows it once) and its axes, flattened."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).ravel())


def _client_labels(table) -> list[str]:
    extra = table["device"] if "device" in table else table["block"]
    return [f"client {c}\n{e}" for c, e in zip(table["client"], extra, strict=True)]


def plot_client_population(table):
    """Memory and compute per client (``analysis.client_table``): 2 axes.

    Left: MiB of the dense LLM vs the client's SLM stored sparse. Right: GFLOPs per token of the SLM,
    the dense LLM's as a dashed line.
    """
    import numpy as np

    fig, (ax_mem, ax_flops) = _panel_figure(2, width=4.8)
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
    import pandas as pd
    import seaborn as sns

    if isinstance(mixes, pd.DataFrame):
        mixes = {title or "task mix": mixes}
    tasks = list(dict.fromkeys(t for m in mixes.values() for t in m.columns))
    colors = dict(zip(tasks, sns.color_palette("tab10", len(tasks)), strict=True))
    fig, axes = _panel_figure(len(mixes), width=3.8)
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
    fig, axes = _panel_figure(len(clients), width=3.2, height=2.8)
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
    import math

    import numpy as np

    fig, axes = _panel_figure(2, width=4.8)
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
    import numpy as np

    fig = _figure(9.6, 3.0 + 0.3 * (len(table) + 1))
    axd = fig.subplot_mosaic([["mem", "flops"], ["table", "table"]], height_ratios=[3.0, 0.3 * (len(table) + 1)])
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


def _figure(width: float, height: float):
    """An empty constrained-layout Figure, not registered with pyplot (a notebook shows it once)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# ===================================================================== aggregation (03_aggregation)


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
    fig, (ax,) = _panel_figure(1, width=min(9.0, 2.5 + 4.5 * w / max(h, w)), height=3.6)
    im = ax.imshow(cov.cpu().numpy(), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set(xlabel="input coordinate", ylabel="output coordinate", title=title)
    ax.title.set_fontsize(9)
    fig.colorbar(im, ax=ax, ticks=list(range(K + 1)), label="clients owning it")
    return fig


def _owner_colors(K: int):
    """A colormap and norm with one colour per owner count 0..K (white = nobody owns it)."""
    import seaborn as sns
    from matplotlib.colors import BoundaryNorm, ListedColormap

    cmap = ListedColormap(["#ffffff"] + sns.color_palette("viridis", K))
    return cmap, BoundaryNorm([c - 0.5 for c in range(K + 2)], cmap.N)


def plot_aggregator_detail(delta, reference, cov, title: str | None = None, crop=(48, 96)):
    """One aggregator's ΔW_g beside the exact owner mean (``analysis.aggregator_detail``): 4 axes + colorbars.

    Panels, each the top-left ``crop`` (rows, cols) of the module: ΔW_g and the owner mean on one symmetric
    scale (red +, blue -), their difference on its own scale (so a round-off difference still shows), and how
    many clients own each weight.
    """
    import numpy as np

    d, ref, diff = _crop(delta, crop), _crop(reference, crop), _crop(delta.double() - reference.double(), crop)
    c = _crop(cov, crop)
    vmax = max(float(np.abs(d).max()), float(np.abs(ref).max())) or 1.0
    dmax = float(np.abs(diff).max()) or 1.0
    K = max(int(cov.max()) if cov.numel() else 0, 1)
    cmap, norm = _owner_colors(K)
    fig, axes = _panel_figure(4, width=3.2, height=2.8)
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
    import seaborn as sns

    fig, (ax_mean, ax_frac) = _panel_figure(2, width=4.8)
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
    import numpy as np

    fig, axes = _panel_figure(1 if round_norms is None else 2, width=4.8)
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
    fig, (ax,) = _panel_figure(1, width=4.6, height=3.8)
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
    import numpy as np

    fig, (ax_err, ax_dil) = _panel_figure(2, width=5.0)
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
    fig, (ax,) = _panel_figure(1, width=5.2, height=3.4)
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
    fig, axes = _panel_figure(len(panels), width=4.2)
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


# ===================================================================== experiment (04_lego_experiment, 00_tour)


def _crop(t, crop):
    """The top-left ``crop`` (rows, cols) of a 2-D tensor as a numpy array (the whole tensor when None)."""
    a = t.detach().float().cpu().numpy()
    return a if crop is None else a[: crop[0], : crop[1]]


def plot_mask(mask, title: str = "keep-mask", crop=(48, 96)):
    """One module's keep-mask (bool, out x in): 2 axes.

    Left: the share of rows that keep each input feature. Wanda scores |W_ij| x ‖X_j‖, so an input whose
    activations are large is kept in almost every row (spikes towards 100%) and a quiet one almost nowhere.
    Right: the individual weights of the top-left ``crop`` (dark = kept, white = pruned).
    """
    m = mask.detach().float().cpu()
    per_input = 100 * m.mean(0).numpy()  # (in,)
    pruned = 100 * (1 - float(m.mean()))
    fig, (ax_l, ax_c) = _panel_figure(2, width=4.6, height=3.0)
    ax_l.plot(per_input, lw=0.6, color="#3b75af")
    ax_l.axhline(100 - pruned, ls="--", color="k", lw=0.8, label=f"overall: {100 - pruned:.0f}% kept")
    ax_l.set(xlabel="input feature j", ylabel="rows keeping it (%)", ylim=(0, 100), xlim=(0, len(per_input)),
             title=f"{title}: kept per input feature")
    ax_l.legend(fontsize=7, loc="lower right")
    ax_c.imshow(_crop(m, crop), cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax_c.set(xlabel="input feature j", ylabel="output feature i",
             title=f"top-left {crop[0]}x{crop[1]} weights ({pruned:.0f}% pruned)")
    for ax in (ax_l, ax_c):
        ax.title.set_fontsize(9)
    return fig


def plot_layer_sparsity(report):
    """Achieved sparsity per decoder layer, one line per module kind (``blocks.sparsity_report``): 1 axis."""
    fig, (ax,) = _panel_figure(1, width=6.0, height=3.0)
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
    import numpy as np

    arrays = {k: _crop(v, crop) for k, v in deltas.items()}
    vmax = max(float(np.abs(a).max()) for a in arrays.values()) or 1.0
    fig, axes = _panel_figure(len(arrays), width=3.4, height=2.6)
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
    import numpy as np

    x = client_delta.detach().float().cpu().reshape(-1).numpy()
    own = owners.detach().cpu().reshape(-1).numpy()
    rng = np.random.default_rng(seed)
    idx = rng.choice(x.size, size=min(max_points, x.size), replace=False)
    fig, axes = _panel_figure(len(aggregates), width=3.6, height=3.3)
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
    import pandas as pd

    fig, (ax,) = _panel_figure(1, width=6.0, height=3.0)
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
    import seaborn as sns

    fig, axes = _panel_figure(2, width=4.6, height=3.2)
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
    import seaborn as sns

    tasks = list(tasks or [c for c in table.columns if c not in ("condition", "seed", "mean_score", "perplexity")])
    fig, (ax_t, ax_m, ax_p) = _panel_figure(3, width=4.2, height=3.3)
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
    from legokit.names import THRESHOLDS

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
    import seaborn as sns

    fig, axes = _panel_figure(2, width=4.6, height=3.3)
    for ax, col, name in zip(axes, ("own_task_score", "other_task_score"),
                             ("own task (trained on)", "other tasks (never seen)"), strict=True):
        sns.lineplot(data=table, x="sparsity", y=col, hue="condition", marker="o", errorbar="sd",
                     err_style="bars", ax=ax)
        ax.set(xlabel="block sparsity (%)", ylabel="score (points)", title=f"blocks on their {name}",
               xticks=sorted(table["sparsity"].unique()))
        ax.legend(fontsize=7)
    return fig


# ===================================================================== sweeps (legokit sweep, summary.png)

_MAX_SUMMARY_PANELS = 4


def plot_sweep_summary(df, summary=None, params=()):
    """Barplots (mean, error bar = std over the remaining keys) of a sweep's headline results; None if nothing
    to plot. One axis per result column.

    Args:
        df: the sweep's results table (``collect.collect``: one row per point).
        summary: the grid's ``summary`` section ({x, y, hue}), or None for the defaults: x the first varying
            parameter that is not a seed, hue the next one, y the first few numeric results that change.
        params: the parameter columns of ``df`` (every other numeric column is a result).
    """
    import warnings

    import seaborn as sns

    from legokit.collect import is_seed, result_columns, varying_params
    from legokit.grid import summary_spec

    summary = summary_spec(summary)
    if df.empty:
        return None
    params = list(params)
    varying = varying_params(df, params)
    candidates = [k for k in varying if not is_seed(k)] or varying
    x = summary.get("x") or (candidates[0] if candidates else None)
    hue = summary.get("hue") or next((k for k in candidates if k != x), None)
    numeric = result_columns(df, params)
    changing = [c for c in numeric if df[c].nunique() > 1]  # constant columns make dull panels
    ys = list(summary.get("y") or (changing or numeric)[:_MAX_SUMMARY_PANELS])
    missing = [c for c in ys if c not in df.columns]
    if missing:
        warnings.warn(f"summary y column(s) {missing} are not in results.csv (columns: {list(df.columns)})",
                      stacklevel=2)
        ys = [c for c in ys if c in df.columns]
    for key in (x, hue):
        if key is not None and key not in df.columns:
            warnings.warn(f"summary key {key!r} is not a column of results.csv; plotting without it", stacklevel=2)
    x = x if x in df.columns else None
    hue = hue if hue in df.columns and hue != x else None
    if not ys:
        return None

    plot = df.copy()
    for key in (x, hue):
        if key is not None:
            plot[key] = plot[key].astype(str)  # categorical axes, even for numeric keys
    fig, axes = _panel_figure(len(ys), width=4.2, height=3.6)
    for ax, y in zip(axes, ys, strict=True):
        sns.barplot(data=plot, x=x, y=y, hue=hue, errorbar="sd", capsize=0.15, ax=ax)
        ax.set_title(y)
        ax.set_ylabel("")
    rest = [k for k in varying if k not in (x, hue)]
    fig.suptitle(f"mean ± std over {', '.join(rest)}" if rest else "one run per bar", fontsize=9)
    return fig
