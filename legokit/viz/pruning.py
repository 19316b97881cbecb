"""The pruning plots (01_pruning): score distributions, reconstruction error, N:M groups, structured blocks, and
how one keep-mask nests in a lower-sparsity one."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from legokit.names import LORA_TARGETS
from legokit.utils import LegokitError
from legokit.viz.figure import panel_figure, top_left

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
    methods = list(dict.fromkeys(sample["method"]))
    fig, axes = panel_figure(4, width=3.3, height=2.7, nrows=2)
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
    blocks = list(dict.fromkeys(errors["block"])) if "block" in errors else [None]
    tables = {}
    for b in blocks:
        d = errors if b is None else errors[errors["block"] == b]
        tables[b] = d.pivot_table(index="layer", columns="kind", values="rel_error").reindex(
            columns=[k for k in LORA_TARGETS if k in set(d["kind"])])
    vmax = max(float(np.nanmax(t.to_numpy())) for t in tables.values()) or 1.0
    rows = max(len(t) for t in tables.values())
    fig, axes = panel_figure(len(blocks), width=3.6, height=1.2 + 0.22 * rows)
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
    full = mask.detach().cpu()
    out_f, in_f = full.shape
    if in_f % m:
        raise LegokitError(f"the mask's {in_f} inputs do not split into groups of {m}")
    per_group = full.reshape(out_f, in_f // m, m).sum(-1)  # (out, in/m) kept per group
    lo, hi = int(per_group.min()), int(per_group.max())
    a = top_left(full, crop)
    a = a[:, : a.shape[1] - a.shape[1] % m]  # whole groups only
    h, w = a.shape
    fig, (ax,) = panel_figure(1, width=min(10.0, 1.5 + 0.3 * w), height=1.2 + 0.32 * h)
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
    fig, (ax_h, ax_c) = panel_figure(2, width=4.8, height=1.4 + 0.09 * layers)
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
    m, lo = top_left(mask, crop).astype(bool), top_left(lower, crop).astype(bool)
    state = np.where(m & lo, 3, np.where(lo & ~m, 2, np.where(m & ~lo, 0, 1)))  # 0 violation .. 3 kept by both
    colors = ["#d62728", "#f0f0f0", "#ef8636", "#1f3b73"]
    labels = ["kept here, pruned below (violation)", "pruned at both", "newly pruned here", "kept at both"]
    fig, (ax_m, ax_n, ax_s) = panel_figure(3, width=3.6, height=3.0)
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
