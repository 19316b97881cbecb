"""The LEGO Studio as ipywidgets (05_studio): controls, Run / Stop, live pictures, and a compare panel.

The controller is ``legokit.studio.Studio`` (plain Python, no plotting); the pictures are ``legokit.viz.studio``'s.
"""

from __future__ import annotations

import html

from legokit.studio import Studio, StudioRun
from legokit.utils import LegokitError
from legokit.viz.studio import plot_compare, plot_losses, plot_run_coverage, png


def studio(profile: str = "quick", model: str | None = None, **kwargs):
    """The LEGO Studio: compose a federation, Run it in the background (live losses and coverage), Stop it,
    compare two finished runs. ``kwargs`` go to ``legokit.studio.Studio`` (``workdir``, ``llm``, ...).

    Returns:
        an ipywidgets ``VBox`` (``studio_widget``); its controller is ``.studio`` (``.studio.wait()`` waits for
        the running run).
    """
    return studio_widget(Studio(profile, model, **kwargs))


def studio_widget(st: Studio, max_clients: int = 8):
    """The Studio as ipywidgets: controls, Run / Stop, a status line, live loss and coverage pictures, and a
    compare panel. CSS classes: ``legokit-studio`` (the box), ``legokit-studio-run``, ``-stop``, ``-status``,
    ``-losses``, ``-coverage``, ``-compare`` (the panel), ``-compare-button``.

    Returns:
        a ``VBox`` with ``.studio`` (the controller), ``.values()`` (the current choices, ``Studio.config``'s
        arguments), ``.controls``, ``.clients`` (one row of controls per client), ``.run_button``,
        ``.stop_button``, ``.status``, ``.losses``, ``.coverage`` (``Image`` widgets of PNG bytes),
        ``.compare_a``, ``.compare_b``, ``.compare_button``, ``.compare_image``, ``.compare_table``.
    """
    import ipywidgets as W  # heavy optional dependency, loaded when the widget is built

    d = st.defaults()
    levels = [(f"{s:.0%}", s) for s in st.levels]
    wide = W.Layout(width="220px")
    controls = {
        "clients": W.BoundedIntText(value=d["clients"], min=1, max=max_clients, description="clients",
                                    layout=wide),
        "aggregator": W.Dropdown(options=st.aggregators, value=d["aggregator"], description="aggregator",
                                 layout=wide),
        "broadcast": W.Dropdown(options=st.broadcasts, value=d["broadcast"], description="broadcast", layout=wide),
        "rounds": W.BoundedIntText(value=d["rounds"], min=1, max=50, description="rounds", layout=wide),
        "local_steps": W.BoundedIntText(value=d["local_steps"], min=1, max=500, description="local steps",
                                        layout=wide),
    }
    rows_box = W.VBox()
    rows: list[dict] = []

    def client_row(k: int) -> dict:
        prev = rows[k] if k < len(rows) else None
        sp = prev["sparsity"].value if prev else d["sparsities"][k % len(d["sparsities"])]
        task = prev["task"].value if prev else d["tasks"][k % len(d["tasks"])]
        ex = prev["examples"].value if prev else d["examples"][k % len(d["examples"])]
        return {"sparsity": W.Dropdown(options=levels, value=sp, description="sparsity",
                                       layout=W.Layout(width="170px")),
                "task": W.Dropdown(options=st.tasks, value=task, description="task", layout=W.Layout(width="240px")),
                "examples": W.BoundedIntText(value=ex, min=0, max=100_000, description="examples",
                                             layout=W.Layout(width="170px"))}

    def rebuild(_=None):
        rows[:] = [client_row(k) for k in range(controls["clients"].value)]
        rows_box.children = [W.HBox([W.HTML(f"<b>client {k}</b>", layout=W.Layout(width="60px")),
                                     r["sparsity"], r["task"], r["examples"]]) for k, r in enumerate(rows)]

    controls["clients"].observe(rebuild, names="value")
    rebuild()

    run_button = W.Button(description="Run", button_style="success", icon="play")
    stop_button = W.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
    status = W.HTML(value="Choose the federation, then press <b>Run</b>.")
    losses = W.Image(value=png(plot_losses(None)), format="png")
    cover = W.Image(value=png(plot_run_coverage(None)), format="png")
    compare_a = W.Dropdown(options=[], description="run A", layout=W.Layout(width="380px"))
    compare_b = W.Dropdown(options=[], description="run B", layout=W.Layout(width="380px"))
    compare_button = W.Button(description="compare", icon="columns")
    compare_image = W.Image(format="png")
    compare_table = W.HTML()
    panel = W.VBox([W.HTML("<b>Compare two runs</b>"), W.HBox([compare_a, compare_b, compare_button]),
                    compare_image, compare_table])
    for w, cls in ((run_button, "run"), (stop_button, "stop"), (status, "status"), (losses, "losses"),
                   (cover, "coverage"), (panel, "compare"), (compare_button, "compare-button")):
        w.add_class(f"legokit-studio-{cls}")

    def values() -> dict:
        return {**{k: c.value for k, c in controls.items()}, "sparsities": [r["sparsity"].value for r in rows],
                "tasks": [r["task"].value for r in rows], "examples": [r["examples"].value for r in rows]}

    def say(text: str, error: bool = False) -> None:
        color = "#b00" if error else "#222"
        cls = "legokit-error" if error else "legokit-studio-message"
        status.value = f'<span class="{cls}" style="color:{color}">{html.escape(text)}</span>'

    def show(run: StudioRun) -> None:  # from the run's thread: set values, never `with output:`
        say(run.message, error=run.status == "failed")
        if run.rounds or run.done:
            losses.value = png(plot_losses(run))
            cover.value = png(plot_run_coverage(run))
        running = not run.done
        run_button.disabled, stop_button.disabled = running, not running
        if run.done:  # offer the ended runs; preselect the newest against the one before it
            options = [(r.label, r.index) for r in st.runs if r.done]
            compare_a.options, compare_b.options = options, options
            indexes = [i for _, i in options]
            compare_a.value, compare_b.value = indexes[max(0, len(indexes) - 2)], indexes[-1]

    def on_run(_=None) -> None:
        try:
            st.start(**values())
        except LegokitError as err:
            say(str(err), error=True)

    def on_compare(_=None) -> None:
        if compare_a.value is None or compare_b.value is None:
            say("compare needs two ended runs: press Run twice first", error=True)
            return
        try:
            cmp = st.compare(compare_a.value, compare_b.value)
        except LegokitError as err:
            say(str(err), error=True)
            return
        compare_image.value = png(plot_compare(cmp))
        compare_table.value = cmp._repr_html_()

    st.on_update(show)
    run_button.on_click(on_run)
    stop_button.on_click(lambda _: st.stop())
    compare_button.on_click(on_compare)
    box = W.VBox([W.HTML("<h3>LEGO Studio</h3>"), W.HBox([W.VBox(list(controls.values())[:3]),
                                                          W.VBox(list(controls.values())[3:])]),
                  rows_box, W.HBox([run_button, stop_button]), status, W.HBox([losses, cover]), panel])
    box.add_class("legokit-studio")
    box.studio, box.values, box.controls, box.clients = st, values, controls, rows
    box.run_button, box.stop_button, box.status, box.losses, box.coverage = (run_button, stop_button, status,
                                                                             losses, cover)
    box.compare_a, box.compare_b, box.compare_button = compare_a, compare_b, compare_button
    box.compare_image, box.compare_table = compare_image, compare_table
    return box
