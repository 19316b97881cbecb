"""The membership-inference audit's picture (``legokit audit``): ROC curves of each attack on each audited model."""

from __future__ import annotations

from legokit.utils import LegokitError
from legokit.viz.figure import panel_figure

_COLORS = {"loss": "#3b75af", "reference": "#ef8636"}


def plot_roc_curves(audit: dict, members_of: str | None = None, log: bool = False):
    """ROC curves of the audit's attacks (``legokit.audit.audit_run``'s result or ``audit.json``): one axis per model.

    Args:
        audit: the audit; its rows carry each curve (``roc``) and AUC.
        members_of: whose members: ``"client K"`` or ``"all"`` (default: the last group of the rows: all clients
            pooled, or the one client that trained).
        log: log-log axes, where the low-FPR corner that the TPR at 1% FPR reads is visible (from half a
            non-member up).
    Returns:
        the Figure; each curve's label gives its AUC and interval, the dotted diagonal is chance.
    """
    rows = audit["rows"]
    if members_of is None:
        members_of = rows[-1]["members_of"]
    groups = list(dict.fromkeys(r["members_of"] for r in rows))
    if members_of not in groups:
        raise LegokitError(f"members_of={members_of!r} is not in the audit: use one of {groups}")
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = panel_figure(len(models), width=3.6, height=3.4)
    for ax, model in zip(axes, models, strict=True):
        low = 1.0
        for r in (r for r in rows if r["model"] == model and r["members_of"] == members_of):
            ax.step(r["roc"]["fpr"], r["roc"]["tpr"], where="post", color=_COLORS.get(r["attack"]),
                    label=f"{r['attack']}: AUC {r['auc']:.2f} [{r['auc_low']:.2f}, {r['auc_high']:.2f}]")
            low = min(low, 0.5 / r["nonmembers"])
        ax.plot([low if log else 0, 1], [low if log else 0, 1], ls=":", color="k", lw=1)
        if log:
            ax.set(xscale="log", yscale="log", xlim=(low, 1), ylim=(low, 1))
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate")
        ax.set_title(f"{model[:38]}\nmembers of {members_of} ({r['members']} in, {r['nonmembers']} out)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    return fig
