"""The notebooks as a person uses them: JupyterLab in headless Chromium, Run All, then every widget operated.

Each test opens one notebook (a copy; see ``tests/lab.py``), runs it on its quick profile through JupyterLab's own
"Run All Cells", checks that no cell raised, then operates every legokit widget in it (types a slider value, picks
a dropdown entry, presses a button) and asserts that what the widget shows changed (its picture's PNG data, its
table's numbers) or, for a bad value, that the widget shows the error and keeps its picture. Screenshots go to the
test's run directory (printed at the end); ``LEGOKIT_SCREENSHOTS=DIR`` also saves each notebook's picture for the
README there.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``) and the
default LLM (``legokit setup``). Without a browser the tests are skipped with that install command, unless
``LEGOKIT_REQUIRE_BROWSER=1`` (set by ``.ci/run``), which turns a missing browser into a failure.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.lab import Lab, browser_missing

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.notebook]

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
README_SHOTS = os.environ.get("LEGOKIT_SCREENSHOTS")
INTERACTIONS: dict[str, int] = {}  # notebook -> widget interactions checked (printed in the summary)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    missing = browser_missing()
    if missing:
        if os.environ.get("LEGOKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"LEGOKIT_REQUIRE_BROWSER=1 but no browser test can run: {missing}")
        pytest.skip(f"no browser here ({missing})")
    root = tmp_path_factory.mktemp("browser")
    lab = Lab(NOTEBOOKS, root, root / "screenshots")
    yield lab
    lab.close()
    print(f"\nbrowser screenshots: {root / 'screenshots'}; widget interactions checked: {INTERACTIONS}")


def _readme_shot(lab: Lab, notebook: str, css: str) -> None:
    if README_SHOTS:
        lab.element_shot(css, Path(README_SHOTS) / f"{notebook}.png")


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+|-?\d+", text)]


def _run(lab: Lab, notebook: str, timeout: float = 900) -> None:
    lab.open(f"{notebook}.ipynb")
    seconds = lab.run_all(timeout)
    lab.screenshot(f"{notebook}-ran")
    print(f"{notebook}: ran in the browser in {seconds:.0f} s")
    assert lab.count(".jp-OutputArea-output img") > 0, f"{notebook} shows no picture after Run All"


def _text(outputs: list[dict]) -> str:
    """What nbval compares in a checked cell: streams and plain-text results (pictures are compared elsewhere)."""
    parts = []
    for o in outputs:
        if o["output_type"] == "stream":
            parts.append("".join(o["text"]))
        elif o["output_type"] in ("execute_result", "display_data") and "text/plain" in o.get("data", {}):
            if "application/vnd.jupyter.widget-view+json" not in o["data"]:
                parts.append("".join(o["data"]["text/plain"]))
    return "".join(parts).rstrip()


def check_outputs(lab: Lab, notebook: str) -> int:
    """Save the notebook the browser ran and hold it to nbval's rule: no cell raised, and every cell marked
    ``# NBVAL_CHECK_OUTPUT`` printed exactly its stored output. Returns the number of checked cells."""
    ran = lab.save()
    stored = __import__("json").loads((NOTEBOOKS / f"{notebook}.ipynb").read_text())
    ran_cells = [c for c in ran["cells"] if c["cell_type"] == "code"]
    stored_cells = [c for c in stored["cells"] if c["cell_type"] == "code"]
    assert len(ran_cells) == len(stored_cells), f"{notebook}: the browser's copy has other cells than the repository's"
    checked = 0
    for k, (r, s) in enumerate(zip(ran_cells, stored_cells, strict=True)):
        errors = [o for o in r["outputs"] if o["output_type"] == "error"]
        assert not errors, f"{notebook} code cell {k} raised {errors[0]['ename']}: {errors[0]['evalue']}"
        if "# NBVAL_CHECK_OUTPUT" in "".join(s["source"]):
            assert _text(r["outputs"]) == _text(s["outputs"]), (
                f"{notebook} code cell {k} (# NBVAL_CHECK_OUTPUT) printed other output in the browser than stored:\n"
                f"--- stored\n{_text(s['outputs'])}\n--- browser\n{_text(r['outputs'])}")
            checked += 1
    return checked


def _stored_pictures(notebook: str) -> int:
    nb = __import__("json").loads((NOTEBOOKS / f"{notebook}.ipynb").read_text())
    return sum("image/png" in o.get("data", {}) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])


@pytest.mark.parametrize("notebook", ["00_tour", "04_lego_experiment"])
def test_stored_notebook_opens_with_its_pictures(lab, notebook):
    """The two notebooks without widgets (nbval runs them): opened from a fresh clone, JupyterLab shows every stored
    picture and no stale progress line."""
    lab.open(f"{notebook}.ipynb")
    stored = _stored_pictures(notebook)
    assert stored > 0
    lab.wait(lambda: lab.count(".jp-OutputArea-output img") >= stored, 60, f"{notebook}'s {stored} stored pictures")
    text = lab.js("return document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook').innerText")
    assert "Loading weights" not in text and "%|" not in text, f"{notebook} shows a stale progress line"
    # `make lab`'s settings (configs/jupyterlab/overrides.json): no "official Jupyter news?" toast over the notebook
    # (without them JupyterLab 4.6 shows it a few seconds after start-up)
    time.sleep(5)
    toasts = lab.js("return [...document.querySelectorAll('.Toastify__toast')].map(t => t.innerText)")
    assert not [t for t in toasts if "news" in t.lower()], f"a news prompt covers {notebook}: {toasts}"
    lab.screenshot(f"{notebook}-opened")
    _readme_shot(lab, notebook, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output img")


def _operate(lab: Lab, notebook: str, kind: str, action, what: str, timeout: float = 120, index: int = 0) -> str:
    """Do ``action(box)`` on a widget and wait until its picture changed; counts one interaction."""
    box = lab.widget(kind, index)
    before = lab.picture(box)
    assert before, f"the {kind} widget shows nothing before {what}"
    action(box)
    after = lab.changed(box, before, timeout, f"the {kind} widget to redraw after {what}")
    assert not lab.status(box), f"{kind} shows an error after {what}: {lab.status(box)}"
    INTERACTIONS[notebook] = INTERACTIONS.get(notebook, 0) + 1
    lab.screenshot(f"{notebook}-{kind}-{INTERACTIONS[notebook]}")
    return after


def _refuse(lab: Lab, notebook: str, kind: str, action, what: str, expect: str, timeout: float = 60) -> None:
    """Do ``action(box)`` with a value the widget cannot draw: it shows the error and keeps its picture."""
    box = lab.widget(kind)
    before = lab.picture(box)
    action(box)
    lab.wait(lambda: expect in lab.status(box), timeout, f"the {kind} widget to refuse {what}")
    assert lab.picture(box) == before, f"the {kind} widget dropped its picture after refusing {what}"
    INTERACTIONS[notebook] = INTERACTIONS.get(notebook, 0) + 1
    lab.screenshot(f"{notebook}-{kind}-refused")


def test_01_pruning_in_the_browser(lab):
    nb = "01_pruning"
    _run(lab, nb)
    assert check_outputs(lab, nb) > 0
    _operate(lab, nb, "mask-explorer", lambda b: lab.select(b, "method", "magnitude"), "picking magnitude")
    _operate(lab, nb, "mask-explorer", lambda b: lab.set_text_value(b, "sparsity", 0.8), "sparsity 0.8")
    _operate(lab, nb, "mask-explorer", lambda b: lab.select(b, "module", 0), "picking the first module")
    # 2:4 at 80% is a contradiction: refused in red, the 80% picture stays; at 50% it draws
    _refuse(lab, nb, "mask-explorer", lambda b: lab.select(b, "pattern", "2:4"), "2:4 at 80%", "contradicts")
    _operate(lab, nb, "mask-explorer", lambda b: lab.set_text_value(b, "sparsity", 0.5), "2:4 at 50%")
    _readme_shot(lab, nb, ".legokit-mask-explorer")


def test_02_clients_in_the_browser(lab):
    nb = "02_clients"
    _run(lab, nb)
    assert check_outputs(lab, nb) > 0
    # the notebook leaves the editor showing a refused budget; a budget that fits redraws and clears the error
    _operate(lab, nb, "device-editor", lambda b: lab.set_text_value(b, "client 3", 600), "a 600 MiB budget")
    _refuse(lab, nb, "device-editor", lambda b: lab.set_text_value(b, "client 3", 1), "a 1 MiB budget", "fits no block")
    _operate(lab, nb, "partition-explorer", lambda b: lab.set_text_value(b, "alpha", 20), "alpha 20")
    _readme_shot(lab, nb, ".legokit-device-editor")


def test_03_aggregation_in_the_browser(lab):
    nb = "03_aggregation"
    _run(lab, nb)
    assert check_outputs(lab, nb) > 0
    _operate(lab, nb, "aggregator-explorer", lambda b: lab.select(b, "aggregator", "fedavg"), "picking fedavg")
    _operate(lab, nb, "aggregator-explorer", lambda b: lab.select(b, "module", 2), "picking another module")
    _operate(lab, nb, "module-explorer", lambda b: lab.select(b, "module", 3), "picking another module")
    _readme_shot(lab, nb, ".legokit-aggregator-explorer")


def test_05_studio_in_the_browser(lab):
    nb = "05_studio"
    _run(lab, nb)
    assert check_outputs(lab, nb) >= 0
    box = lab.widget("studio")
    status = ".legokit-studio-status"
    # an impossible federation is refused before anything runs
    lab.set_text_value(box, "examples", 0)
    lab.click(box, ".legokit-studio-run")
    lab.wait(lambda: "example" in lab.status(box, status).lower() and lab.count(".legokit-studio .legokit-error"),
             30, "the Studio to refuse a client with 0 examples")
    INTERACTIONS[nb] = 1
    lab.screenshot(f"{nb}-studio-refused")
    lab.set_text_value(box, "examples", 8)
    losses_before = lab.js("return arguments[0].querySelector('.legokit-studio-losses').src", box)
    runs_before = len(lab.js("return [...arguments[0].querySelectorAll('.legokit-studio-compare select')[0]"
                             ".options].map(o => o.text)", box))
    lab.click(box, ".legokit-studio-run")
    run = f"run {runs_before + 1} finished: "  # the notebook's own runs are 1 .. runs_before
    lab.wait(lambda: run in lab.status(box, status).replace("\xa0", " "), 300, f"the Studio's {run!r}")
    assert lab.js("return arguments[0].querySelector('.legokit-studio-losses').src", box) != losses_before
    # the compare menus list the new run (the widget updates them right after the status line)
    lab.wait(lambda: len(lab.js("return [...arguments[0].querySelectorAll('.legokit-studio-compare select')[0]"
                                ".options].map(o => o.text)", box)) == runs_before + 1, 30,
             "the compare menus to list the new run")
    INTERACTIONS[nb] += 1
    lab.screenshot(f"{nb}-studio-ran")
    compare = lab.js("return arguments[0].querySelector('.legokit-studio-compare img')?.src || ''", box)
    lab.click(box, ".legokit-studio-compare-button")
    lab.wait(lambda: lab.js("return arguments[0].querySelector('.legokit-studio-compare img')?.src || ''", box)
             not in ("", compare), 60, "the compare panel to draw two runs")
    INTERACTIONS[nb] += 1
    lab.screenshot(f"{nb}-studio-compared")
    _readme_shot(lab, nb, ".legokit-studio")
    # a 3-round run, stopped once its first round is in: it ends early and keeps its finished rounds
    lab.set_text_value(box, "rounds", 3)
    lab.set_text_value(box, "local steps", 8)  # rounds long enough to press Stop between two of them
    lab.click(box, ".legokit-studio-run")
    # round 1 is in once its line reads finished, or round 2's has replaced it (a poll can miss a short round)
    first = (f"run {runs_before + 2}: round 1/3 finished", f"run {runs_before + 2}: round 2/3")
    lab.wait(lambda: any(t in lab.status(box, status).replace("\xa0", " ") for t in first), 300,
             f"the Studio's {first[0]!r}")
    lab.click(box, ".legokit-studio-stop")
    stopped = f"run {runs_before + 2} stopped after round "
    lab.wait(lambda: stopped in lab.status(box, status).replace("\xa0", " "), 300, "the Studio to stop")
    assert "3/3" not in lab.status(box, status), "Stop did not stop the run early"
    INTERACTIONS[nb] += 1
    lab.screenshot(f"{nb}-studio-stopped")
