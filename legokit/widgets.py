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

    return _redrawing(slider, draw)


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

    return _redrawing(dropdown, draw)


def _redrawing(control, draw):
    """A ``VBox`` of ``control`` above an output area that shows ``draw(value)`` whenever the value changes.

    The box gets ``.draw(value)`` (the Figure, for headless use) and ``.update(value)`` (redraw into the box).
    """
    import ipywidgets as W
    from IPython.display import display

    out = W.Output()

    def update(value) -> None:
        out.clear_output(wait=True)
        with out:
            display(draw(value))

    control.observe(lambda change: update(change["new"]), names="value")
    box = W.VBox([control, out])
    box.draw, box.update = draw, update
    return box

