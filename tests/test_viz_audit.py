"""The membership-inference audit's ROC picture: it draws the curves and AUCs the audit's rows hold."""

import numpy as np
import pytest

from legokit import viz
from legokit.audit import audit_rows, roc_curve
from legokit.utils import LegokitError


def _audit() -> dict:
    """An audit of two models on two clients' members from synthetic losses (no model): the global LLM's member
    losses are lower by 1, the block's not at all."""
    rng = np.random.default_rng(0)
    examples = []
    for k in (0, 1):
        for member in (True, False):
            for i in range(30 if member else 60):
                base = float(rng.uniform(1, 4))
                examples.append({"uid": f"{k}-{member}-{i}", "task": "piqa", "client": k, "member": member,
                                 "loss": {"base LLM": base, "global LLM": base - member + 0.1 * rng.normal(),
                                          "block b": base + 0.1 * rng.normal()}})
    audit = {"models": ["global LLM", "block b"], "examples": examples}
    audit["rows"] = audit_rows(audit, n_boot=100)
    return audit


def test_roc_curves_draw_each_attack_s_curve_with_its_auc_per_model():
    audit = _audit()
    fig = viz.plot_roc_curves(audit)
    assert len(fig.axes) == 3 and "members of all" in fig.axes[0].get_title()  # the base LLM's control first
    rows = [r for r in audit["rows"] if r["members_of"] == "all"]
    for ax, model in zip(fig.axes, ["base LLM", "global LLM", "block b"], strict=True):
        mine = [r for r in rows if r["model"] == model]
        curves = ax.lines[: len(mine)]
        for line, r in zip(curves, mine, strict=True):
            np.testing.assert_allclose(line.get_xdata(), r["roc"]["fpr"])
            np.testing.assert_allclose(line.get_ydata(), r["roc"]["tpr"])
            assert line.get_label().startswith(f"{r['attack']}: AUC {r['auc']:.2f}")
    ref = {r["model"]: r["auc"] for r in rows if r["attack"] == "reference"}
    assert ref["global LLM"] > 0.95 and ref["block b"] == pytest.approx(0.5, abs=0.12)
    assert [r["auc"] for r in rows if r["model"] == "base LLM"] == [pytest.approx(0.5, abs=0.12)]
    m = np.array([-e["loss"]["global LLM"] for e in audit["examples"] if e["member"] and e["client"] == 0])
    u = np.array([-e["loss"]["global LLM"] for e in audit["examples"] if not e["member"] and e["client"] == 0])
    fig = viz.plot_roc_curves(audit, members_of="client 0", log=True)
    np.testing.assert_allclose(fig.axes[1].lines[0].get_xdata(), roc_curve(m, u)[0])
    assert fig.axes[0].get_xscale() == "log"
    with pytest.raises(LegokitError, match="members_of='client 7' is not in the audit"):
        viz.plot_roc_curves(audit, members_of="client 7")
