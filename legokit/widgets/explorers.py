"""ipywidgets explorers for JupyterLab (01-03): each redraws one ``legokit.viz`` picture when a control changes.

Each function returns a widget; it only calls legokit's analyses and ``viz``. Sections by notebook; nothing in the
core modules imports this package.
"""

from __future__ import annotations

import html
import math

from matplotlib.figure import Figure

from legokit import viz  # called as viz.plot_*: looked up when drawing, so a test can swap a plot
from legokit.aggregate import AGGREGATORS
from legokit.analysis import (
    aggregator_detail,
    block_cost_table,
    blocks_for_budgets,
    energy_by_rank,
    mask_stats,
    module_masks,
    reaggregate,
    score_sample,
    task_mix,
)
from legokit.experiment import client_partitions
from legokit.prune import check_method, parse_pattern, resolve_sparsity
from legokit.utils import LegokitError

# ===================================================================== pruning (01_pruning)


def mask_explorer(llm, stats, modules=None, methods=("magnitude", "wanda", "sparsegpt"),
                  patterns=("unstructured", "2:4", "4:8"), module: str | None = None, method: str = "wanda",
                  pattern: str = "unstructured", sparsity: float = 0.5, gap: float = 0.25, crop=(32, 64)):
    """Module, method, pattern and sparsity controls that redraw one module's keep-mask (``viz.plot_mask_nesting``).

    The picture: a corner of the mask, the same corner against the mask ``gap`` sparsity lower (unstructured;
    dense for N:M), and the mask's statistics (``analysis.mask_stats``). Masks come from
    ``analysis.module_masks`` (as ``extract_blocks`` makes them, one_shot); SparseGPT's are chosen level by
    level, every ``gap`` up to the sparsity, so a redraw takes a few OBS passes over one module.

    Args:
        llm: the LLM; ``stats``: its ``analysis.calibration_stats`` (computed once, before the explorer).
        modules: the dropdown's modules (default: every module ``stats`` observed).
    Returns:
        an ipywidgets ``VBox`` (CSS class ``legokit-mask-explorer``); ``.draw(module, method, pattern, sparsity)``
        returns the Figure (headless), ``.update(...)`` sets controls and redraws. A sparsity outside [0, 1), one
        an N:M pattern does not allow, or an unknown module / method shows in the status line.
    """
    import ipywidgets as W  # heavy optional dependency, loaded when a widget is built

    names = list(modules or stats.modules)
    layout = W.Layout(width="420px")
    controls = {"module": W.Dropdown(options=names, value=module or names[len(names) // 2], description="module",
                                     layout=layout),
                "method": W.Dropdown(options=list(methods), value=method, description="method"),
                "pattern": W.Dropdown(options=list(patterns), value=pattern, description="pattern"),
                "sparsity": W.FloatSlider(value=sparsity, min=0.0, max=0.95, step=0.05, description="sparsity",
                                          continuous_update=False, readout_format=".0%")}

    def draw(module: str, method: str, pattern: str, sparsity: float):
        stats.check(module)
        check_method(method)
        pat = parse_pattern(pattern)
        s = resolve_sparsity(sparsity, pat)
        if pat.kind == "nm":
            chain = [0.0, s]
        else:  # every gap below s, as extract_blocks' levels: SparseGPT's masks depend on the chain
            chain = sorted({round(max(0.0, s - k * gap), 6) for k in range(int(s / gap + 1e-9) + 2)})
        masks = module_masks(llm, stats, module, method, chain, str(pat))
        mask = masks[-1]
        lower, lower_s = (masks[-2], chain[-2]) if len(chain) > 1 else (masks[-1], chain[-1])
        title = f"{module.removeprefix('model.')}\n{method}, {pat}, {s:.0%} pruned"
        return viz.plot_mask_nesting(mask, lower, mask_stats(mask, lower), title=title,
                                 lower_label=f"the {lower_s:.0%} mask", crop=crop)

    return _explorer("mask-explorer", controls, draw)


def score_explorer(llm, stats, methods=("magnitude", "wanda", "sparsegpt"), layer: int | None = None,
                   sparsity: float = 0.5, n: int = 2000, overlap=None):
    """A layer dropdown that redraws every method's score distributions there (``viz.plot_score_distributions``).

    Args:
        llm, stats: the LLM and its ``analysis.calibration_stats``; the dropdown lists the observed layers.
        sparsity, n: passed to ``analysis.score_sample``; ``overlap``: optional ``analysis.kept_overlap`` of two
            blocks, shown per module kind for the chosen layer.
    Returns:
        an ipywidgets ``VBox`` (CSS class ``legokit-score-explorer``) with ``.draw(layer)`` / ``.update(layer)``.
    """
    import ipywidgets as W  # heavy optional dependency, loaded when a widget is built

    layers = stats.layers
    dropdown = W.Dropdown(options=layers, value=layers[len(layers) // 2] if layer is None else layer,
                          description="layer")

    def draw(layer: int):
        sample = score_sample(llm, stats, [layer], methods, sparsity=sparsity, n=n)
        ov = None if overlap is None else overlap[overlap["layer"] == layer]
        fig = viz.plot_score_distributions(sample, ov)
        fig.suptitle(f"decoder layer {layer}", fontsize=10)
        return fig

    return _explorer("score-explorer", {"layer": dropdown}, draw)

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

    import ipywidgets as W  # heavy optional dependency, loaded when a widget is built

    slider = W.FloatLogSlider(value=alpha, base=10, min=math.log10(min_alpha), max=math.log10(max_alpha),
                              step=0.1, description="alpha", continuous_update=False, readout_format=".2g")

    def draw(a: float):
        parts = client_partitions(cfg.with_overrides({"data.partition": "dirichlet", "data.alpha": float(a)}))
        return viz.plot_task_mix(task_mix(parts, cfg.data.tasks), title=f"dirichlet, alpha = {a:.2g}")

    return _explorer("partition-explorer", {"alpha": slider}, lambda alpha: draw(alpha))


def device_editor(llm, blocks, budgets_mb, devices=None, context: int = 256, max_mb: float | None = None):
    """One memory-budget slider per client (MiB) that redraws which block each client gets and what it costs.

    Each client gets the densest block whose SLM, stored sparse, fits its budget
    (``analysis.blocks_for_budgets``); the picture is ``viz.plot_budget_fit``: budgets against block sizes,
    FLOPs per token, and a table. A budget below the smallest block shows the error and keeps the picture.

    Args:
        llm, blocks: the LLM and the extracted blocks (their costs are computed once, here).
        budgets_mb: each client's starting budget in MiB (rounded up to the sliders' step), e.g. the ``sparse_mb`` of
            the block it holds now (``analysis.client_table``).
        devices: optional device name per client, shown in the slider labels and the table.
        context: tokens of context of the FLOPs-per-token estimate.
        max_mb: the sliders' upper end (default: 1.2 x the dense LLM's MiB).
    Returns:
        an ipywidgets ``VBox`` with controls ``client0``, ``client1``, ...; ``.draw(client0=..., ...)`` returns
        the Figure, ``.update(client2=300)`` sets budgets and redraws.
    """

    import ipywidgets as W  # heavy optional dependency, loaded when a widget is built

    if devices is not None and len(devices) != len(budgets_mb):
        raise LegokitError(f"{len(devices)} device names for {len(budgets_mb)} budgets: give one per client")
    costs = block_cost_table(llm, blocks, context)
    top = float(max_mb if max_mb is not None else 1.2 * float(costs["dense_mb"].max()))
    # about 500 steps over the range, a power of ten: 1 MiB for SmolLM2-135M, 0.0001 MiB for tiny-llama
    digits = max(0, -math.floor(math.log10(top / 500)))
    step = 10.0**-digits
    budgets = [round(math.ceil(float(b) / step - 1e-6) * step, digits) for b in budgets_mb]  # rounded up
    top = max(round(math.ceil(top / step) * step, digits), *budgets)
    controls = {f"client{k}": W.FloatSlider(
        value=b, min=0, max=top, step=step, readout_format=f".{digits}f", continuous_update=False,
        description=f"client {k}" + (f" ({devices[k]})" if devices is not None else "") + ", MiB",
        style={"description_width": "180px"}, layout=W.Layout(width="560px")) for k, b in enumerate(budgets)}

    def draw(**values):
        table = blocks_for_budgets(costs, [values[f"client{k}"] for k in range(len(budgets))], devices)
        return viz.plot_budget_fit(table, costs)

    return _explorer("device-editor", controls, draw)


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
    import ipywidgets as W  # heavy optional dependency, loaded when a widget is built

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
        fig = viz.plot_energy_by_rank(curves, rs, {f"client r={r_k}": r_k, f"r_g={r_g}": r_g})
        fig.axes[0].set_title(name, fontsize=9)
        return fig

    return _explorer("module-explorer", {"module": dropdown}, lambda module: draw(module))


def aggregator_explorer(strategy, results, aggregators=None, modules=None, aggregator: str | None = None,
                        module: str | None = None, crop=(48, 96)):
    """Aggregator and module dropdowns that draw one ΔW_g beside the exact owner mean, their difference and
    the coverage map (``analysis.aggregator_detail``, ``viz.plot_aggregator_detail``).

    Args:
        strategy, results: the federation's ``LegoStrategy`` and the client results to re-aggregate
            (``strategy.last_results``).
        aggregators: names from ``legokit.aggregate.AGGREGATORS`` (default: all).
        modules: the modules to choose from (default: all of ``strategy.modules``).
        aggregator, module: the starting choice (default: heteagg when offered, else the first; the first module).
        crop: the top-left (rows, cols) of the module drawn.
    Returns:
        an ipywidgets ``VBox``; ``.draw(aggregator, module)`` returns the Figure (its title gives the relative
        error, norm ratio and dilution of ``analysis.aggregation_errors``), ``.update(aggregator=..., module=...)``
        redraws into the widget's output area.
    """
    import ipywidgets as W  # heavy optional dependency, loaded when a widget is built

    aggregators = list(aggregators or AGGREGATORS)
    names = list(modules or strategy.modules)
    aggregator = aggregator or ("heteagg" if "heteagg" in aggregators else aggregators[0])
    controls = {"aggregator": W.Dropdown(options=aggregators, value=aggregator, description="aggregator"),
                "module": W.Dropdown(options=names, value=module or names[0], description="module",
                                     layout=W.Layout(width="480px"))}

    def draw(aggregator: str, module: str):
        detail = aggregator_detail(strategy, results, aggregator, module)
        e = detail["errors"]
        title = (f"{module} · {aggregator}: relative error {e['rel_error']:.2e} vs the exact owner mean "
                 f"(norm ratio {e['norm_ratio']:.3f}, dilution {e['dilution']:.3f})")
        return viz.plot_aggregator_detail(detail["delta"], detail["reference"], detail["coverage"], title, crop)

    return _explorer("aggregator-explorer", controls, draw)


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

    import ipywidgets as W  # heavy optional dependency, loaded when a widget is built

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
        out.outputs = (_display_output(shown),)  # set, not captured: holds headless too, and in saved widget state
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
        return {**dict(zip(controls, args, strict=False)), **overrides}

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


def _display_output(shown) -> dict:
    """``shown`` as one ``display_data`` output of an ``Output`` widget: what ``display(shown)`` would send
    (the kernel's formatters), or its plain formats outside IPython. A matplotlib figure is always a PNG: under a
    non-interactive backend (``MPLBACKEND=Agg``) no formatter draws it, and its text repr would replace the plot."""
    from IPython import get_ipython  # IPython: heavy optional dependency, loaded when a picture is shown
    from IPython.core.formatters import DisplayFormatter

    ip = get_ipython()
    data, metadata = (ip.display_formatter if ip is not None else DisplayFormatter()).format(shown)
    if isinstance(shown, Figure) and "image/png" not in data:
        from IPython.core.pylabtools import print_figure  # IPython: heavy optional dependency

        data = {**data, "image/png": print_figure(shown, "png", base64=True)}
    return {"output_type": "display_data", "data": data, "metadata": metadata}


def _close_figure(shown) -> None:
    """Close a matplotlib figure once it is displayed (inline figures stay in the output as PNG)."""
    import matplotlib.pyplot as plt  # pyplot: heavy optional dependency (it picks a backend), only to close

    if isinstance(shown, Figure):
        plt.close(shown)
