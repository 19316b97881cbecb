"""ipywidgets explorers for JupyterLab. Each function returns a widget; it only calls legokit and viz.

Sections by notebook; nothing in the core modules imports this file.
"""

from __future__ import annotations

# ===================================================================== pruning (01_pruning)

# ===================================================================== clients (02_clients)


def partition_explorer(cfg, alpha: float = 0.5, min_alpha: float = 0.01, max_alpha: float = 100.0):
    """A Dirichlet-alpha slider that redraws each client's task mix (``viz.plot_task_mix``).

    Args:
        cfg: an ``ExperimentConfig``; its ``data`` section says which tasks and how many examples, its
            ``fed.num_clients`` how many clients (the partition is ``client_partitions`` with
            ``data.partition = "dirichlet"``).
        alpha: the slider's start value; small = each client sees few tasks, large = near IID.
    Returns:
        an ipywidgets ``VBox``; ``.draw(alpha)`` returns the Figure for one alpha (for headless output),
        ``.update(alpha)`` redraws it into the widget's output area.
    """
    import math

    import ipywidgets as W

    from legokit.analysis import task_mix
    from legokit.experiment import client_partitions
    from legokit.viz import plot_task_mix

    slider = W.FloatLogSlider(value=alpha, base=10, min=math.log10(min_alpha), max=math.log10(max_alpha),
                              step=0.1, description="alpha", continuous_update=False, readout_format=".2g")

    def draw(a: float):
        parts = client_partitions(cfg.with_overrides({"data.partition": "dirichlet", "data.alpha": float(a)}))
        return plot_task_mix(task_mix(parts, cfg.data.tasks), title=f"dirichlet, alpha = {a:.2g}")

    return _explorer("partition-explorer", {"alpha": slider}, lambda alpha: draw(alpha))


# ===================================================================== aggregation (03_aggregation)


def module_explorer(strategy, results, aggregators=None, ranks=None):
    """A module dropdown that plots how much of each aggregator's ΔW_g a rank-r broadcast keeps.

    Args:
        strategy, results: the federation's ``LegoStrategy`` and the client results to re-aggregate
            (``strategy.last_results``).
        aggregators: names from ``legokit.aggregate.AGGREGATORS`` (default: all).
        ranks: ranks on the x axis (default 1, 2, 4, ... up to the module size).
    Returns:
        an ipywidgets ``VBox``; ``.draw(module)`` returns the Figure for one module (headless output),
        ``.update(module)`` redraws it into the widget's output area.
    """
    import ipywidgets as W

    from legokit.aggregate import AGGREGATORS
    from legokit.analysis import energy_by_rank, reaggregate
    from legokit.viz import plot_energy_by_rank

    aggregators = list(aggregators or AGGREGATORS)
    names = list(strategy.modules)
    dropdown = W.Dropdown(options=names, value=names[0], description="module",
                          layout=W.Layout(width="480px"))

    def draw(name: str):
        deltas = reaggregate(strategy, results, [name], aggregators)
        size = min(strategy.shapes[name])
        rs = list(ranks) if ranks is not None else sorted({min(2**i, size) for i in range(size.bit_length() + 1)})
        curves = {a: energy_by_rank(d[name], rs) for a, d in deltas.items()}
        r_k = int(results[0].factors[name][0].shape[0])
        r_g = strategy.global_rank
        fig = plot_energy_by_rank(curves, rs, {f"client r={r_k}": r_k, f"r_g={r_g}": r_g})
        fig.axes[0].set_title(name, fontsize=9)
        return fig

    return _explorer("module-explorer", {"module": dropdown}, lambda module: draw(module))


def _explorer(kind: str, controls, draw):
    """A ``VBox``: the controls, a status line, and an output area showing ``draw(**values)`` after each change.

    Args:
        kind: the widget's name; the box gets the CSS class ``legokit-<kind>`` (browser tests find it by that).
        controls: ``{keyword: ipywidgets control}``; each control's value is passed to ``draw`` under its keyword.
        draw: ``draw(**values)`` returns what to show (a matplotlib Figure, a DataFrame, ...). A ``LegokitError``
            (a value outside its range, an impossible combination) is shown in the status line, in red, and the
            previous picture stays.
    Returns:
        the box, showing its first picture already, with ``.draw(*values, **values)`` (the picture for given
        values, for headless use; positional values follow the controls' order, missing ones take the controls'
        current values), ``.update(*values, **values)`` (set controls, then redraw into the output area; returns
        the error message, or ``None``), ``.controls``, ``.status`` and ``.out``.
    """
    import html

    import ipywidgets as W
    from IPython.display import display

    from legokit.utils import LegokitError

    controls = dict(controls)
    out = W.Output()
    status = W.HTML(value="")
    status.add_class("legokit-status")

    def values(**overrides):
        return {**{k: c.value for k, c in controls.items()}, **overrides}

    def redraw(**overrides) -> str | None:
        try:
            shown = draw(**values(**overrides))
        except LegokitError as err:
            status.value = f'<span class="legokit-error" style="color:#b00">{html.escape(str(err))}</span>'
            return str(err)
        status.value = ""
        out.clear_output(wait=True)
        with out:
            display(shown)
        _close_figure(shown)
        return None

    def update(**overrides) -> str | None:
        unknown = sorted(set(overrides) - set(controls))
        if unknown:
            raise LegokitError(f"{kind} has no control {unknown}: use {sorted(controls)}")
        # a value a control cannot hold (outside a slider's range, not a dropdown option) is reported, not clamped
        for k, v in overrides.items():
            problem = _out_of_range(controls[k], v)
            if problem:
                status.value = f'<span class="legokit-error" style="color:#b00">{html.escape(problem)}</span>'
                return problem
        with _quiet(controls):
            for k, v in overrides.items():
                controls[k].value = v
        return redraw()

    def named(args, overrides):
        if len(args) > len(controls):
            raise LegokitError(f"{kind} takes at most {len(controls)} positional values ({list(controls)})")
        return {**dict(zip(controls, args)), **overrides}

    for control in controls.values():
        control.observe(lambda change: redraw(), names="value")
    box = W.VBox([*controls.values(), status, out])
    box.add_class(f"legokit-{kind}")
    box.draw = lambda *args, **overrides: draw(**values(**named(args, overrides)))
    box.update = lambda *args, **overrides: update(**named(args, overrides))
    box.controls, box.status, box.out = controls, status, out
    redraw()  # the first picture, so the widget never opens empty
    return box


def _out_of_range(control, value) -> str | None:
    """Why ``value`` cannot be set on ``control`` (a slider's range, a dropdown's options), or ``None``."""
    desc = control.description or type(control).__name__
    options = getattr(control, "options", None)
    if options is not None:
        labels = [o[1] if isinstance(o, tuple) else o for o in options]
        if value not in labels:
            return f"{desc} = {value!r} is not one of the choices {labels}"
        return None
    lo, hi = getattr(control, "min", None), getattr(control, "max", None)
    if lo is not None and hasattr(control, "base"):  # a log slider's min/max are exponents
        lo, hi = control.base ** lo, control.base ** hi
    if lo is not None and not (lo <= value <= hi):
        return f"{desc} = {value!r} is outside its range [{lo:g}, {hi:g}]"
    return None


class _quiet:
    """Set several controls without a redraw per control (the caller redraws once)."""

    def __init__(self, controls):
        self.controls = controls

    def __enter__(self):
        self.held = {k: c._trait_notifiers.get("value", {}).get("change", [])[:] for k, c in self.controls.items()}
        for c in self.controls.values():
            c._trait_notifiers.get("value", {}).get("change", []).clear()

    def __exit__(self, *exc):
        for k, c in self.controls.items():
            c._trait_notifiers.setdefault("value", {}).setdefault("change", []).extend(self.held[k])


def _close_figure(shown) -> None:
    """Close a matplotlib figure once it is displayed (inline figures stay in the output as PNG)."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    if isinstance(shown, Figure):
        plt.close(shown)
