"""The sweep summary (``legokit sweep`` writes it as ``summary.png``)."""

from __future__ import annotations

import warnings

from legokit.grid import summary_spec
from legokit.report import is_seed, result_columns, varying_params
from legokit.viz.figure import panel_figure

_MAX_SUMMARY_PANELS = 4


def plot_sweep_summary(df, summary=None, params=()):
    """Barplots (mean, error bar = std over the remaining keys) of a sweep's headline results; None if nothing
    to plot. One axis per result column.

    Args:
        df: the sweep's results table (``report.collect``: one row per point).
        summary: the grid's ``summary`` section ({x, y, hue}), or None for the defaults: x the first varying
            parameter that is not a seed, hue the next one, y the first few numeric results that change.
        params: the parameter columns of ``df`` (every other numeric column is a result).
    """
    import seaborn as sns  # heavy optional dependency, loaded when a plot needs it

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
    fig, axes = panel_figure(len(ys), width=4.2, height=3.6)
    for ax, y in zip(axes, ys, strict=True):
        sns.barplot(data=plot, x=x, y=y, hue=hue, errorbar="sd", capsize=0.15, ax=ax)
        ax.set_title(y)
        ax.set_ylabel("")
    rest = [k for k in varying if k not in (x, hue)]
    fig.suptitle(f"mean ± std over {', '.join(rest)}" if rest else "one run per bar", fontsize=9)
    return fig
