"""The Studio's pictures (05_studio): a run's losses, its coverage map, and two runs compared.

Each takes the controller's data (``legokit.studio.StudioRun``, ``Comparison``) and returns a Figure; the widget
(``legokit.widgets.studio``) turns them into PNG bytes (``png``). Drawn from the run's thread: the figures are
not registered with pyplot (``panel_figure``).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.ticker import MaxNLocator

from legokit.viz.aggregation import plot_coverage_map
from legokit.viz.figure import panel_figure

if TYPE_CHECKING:  # the controller's types only: drawing a picture needs no federation machinery
    from legokit.studio import Comparison, StudioRun


def _client_label(run: StudioRun, client: int) -> str:
    sp = run.cfg.fed.client_sparsities[client]
    tasks = run.cfg.data.tasks_per_client
    task = ", ".join(tasks[client]) if tasks else ""
    return f"client {client} · {sp:.0%} · {task}"


def plot_losses(run: StudioRun | None):
    """A run's losses: each client's loss per local step over the finished rounds (left), and each client's
    last-step loss per round with their mean (right). Returns a Figure with 2 axes."""
    fig, (ax, ax2) = panel_figure(2, width=4.4, height=3.1)
    if run is None or not run.rounds:
        for a in (ax, ax2):
            a.text(0.5, 0.5, "no finished round yet\n(press Run)" if run is None or not run.done
                   else f"run {run.index}: no round finished", ha="center", va="center", transform=a.transAxes)
            a.set(xticks=[], yticks=[])
        if run is not None:
            fig.suptitle(run.label, fontsize=9)
        return fig
    steps, per_round = run.losses(), run.round_losses()
    colors = {c: f"C{c % 10}" for c in range(run.cfg.fed.num_clients)}
    for c, d in steps.groupby("client"):
        for i, (_, g) in enumerate(d.groupby("round")):
            ax.plot(g["global_step"], g["loss"], color=colors[c], marker="o", ms=2.5, lw=1.2,
                    label=_client_label(run, c) if i == 0 else None)
    for r in run.rounds[1:]:
        first = steps[steps["round"] == r["round"]]["global_step"]
        if len(first):
            ax.axvline(first.min() - 0.5, ls="--", color="grey", lw=0.8)
    ax.set(xlabel="local step (rounds one after the other)", ylabel="response loss", title="loss per local step")
    for c, d in per_round.groupby("client"):
        ok = d[d["status"] == "ok"]
        ax2.plot(ok["round"], ok["loss_last"], color=colors[c], marker="o", lw=1)
        bad = d[d["status"] != "ok"]
        if len(bad):
            ax2.plot(bad["round"], [np.nanmin(per_round["loss_last"]) if per_round["loss_last"].notna().any()
                                    else 0.0] * len(bad), "x", color=colors[c], ms=8, label=f"client {c} failed")
    rounds = [r["round"] for r in run.rounds]
    ax2.plot(rounds, run.round_means(), color="black", marker="s", lw=2, label="mean")
    ax2.set(xlabel="round", ylabel="loss at the round's last step", title="per round", xticks=rounds)
    if len(steps):
        ax.legend(fontsize=7)
    ax2.legend(fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for a in (ax, ax2):
        a.title.set_fontsize(9)
    fig.suptitle(run.label, fontsize=9)
    return fig


def plot_run_coverage(run: StudioRun | None, rnd: int | None = None):
    """The coverage map of the run's module in round ``rnd`` (default: the last finished round)."""
    if run is None or not run.coverage:
        fig, (ax,) = panel_figure(1, width=4.4, height=3.1)
        ax.text(0.5, 0.5, "coverage appears\nafter the first round", ha="center", va="center", transform=ax.transAxes)
        ax.set(xticks=[], yticks=[])
        return fig
    rnd = max(run.coverage) if rnd is None else rnd
    clients = sum(1 for ln in run.lines if ln["round"] == rnd and ln["status"] == "ok")
    return plot_coverage_map(run.coverage[rnd], title=f"run {run.index}, round {rnd}: {run.module}\n"
                                                      f"owners among the {clients} aggregated clients")


def plot_compare(comparison: Comparison):
    """Two runs side by side (``Studio.compare``): the clients' mean loss per local step, the mean last-step loss
    per round, and (when both runs were scored) how much each run changed the global LLM's held-out perplexity.
    Returns a Figure with 2 or 3 axes."""
    a, b = comparison.a, comparison.b
    scored = all(r.score and r.score.get("perplexity") is not None for r in (a, b))
    fig, axes = panel_figure(3 if scored else 2, width=3.6, height=3.1)
    ax, ax2 = axes[:2]
    runs = ((a, "-", "#3b75af"), (b, "--", "#d1603d"))
    names = [f"run {r.index}: {r.cfg.fed.aggregator}/{r.cfg.fed.broadcast}" for r, _, _ in runs]
    for (r, style, color), name in zip(runs, names, strict=True):
        steps = r.losses()
        if len(steps):
            mean = steps.groupby("global_step")["loss"].mean()
            ax.plot(mean.index, mean.values, style, color=color, marker="o", ms=3, label=name)
        ax2.plot([rec["round"] for rec in r.rounds], r.round_means(), style, color=color, marker="s", label=name)
    ax.set(xlabel="local step (rounds one after the other)", ylabel="mean response loss over clients",
           title="loss per local step")
    ax2.set(xlabel="round", ylabel="mean loss at the round's last step", title="per round",
            xticks=sorted({rec["round"] for r in (a, b) for rec in r.rounds}))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if scored:
        ax3 = axes[2]
        change = [r.score["perplexity"] - r.score["base"] for r, _, _ in runs]
        ax3.bar([0, 1], change, color=[c for _, _, c in runs])
        ax3.axhline(0, color="black", lw=0.8)
        ax3.set(xticks=[0, 1], xticklabels=[f"run {a.index}", f"run {b.index}"], ylabel="perplexity change",
                title=f"held-out perplexity after - before\n(before: {a.score['base']:.2f})")
    for x in axes:
        x.title.set_fontsize(9)
    for x in (ax, ax2):
        if x.lines:
            x.legend(fontsize=7)
    return fig


def png(fig, dpi: int = 80) -> bytes:
    """The PNG bytes of a Figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
