"""Repository-wide pytest hooks: nbval's notebook items carry the `notebook` and `slow` markers, a notebook that
the browser tests run is run there only (once per session), and the test session runs without progress bars."""

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    # Notebook kernels inherit this environment. Under nbval a long cell that streams progress-bar widget
    # updates fills the kernel's ZeroMQ iopub queue (1000 messages) while nbval waits for the reply; the
    # "idle" message is then dropped and the cell fails with "Timeout of 5 seconds exceeded waiting for
    # output". No bars, no flood (legokit.utils.progress_bar; transformers' bars via huggingface_hub).
    os.environ.setdefault("LEGOKIT_PROGRESS", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    config.pluginmanager.register(_OneRunPerNotebook(), "legokit-one-run-per-notebook")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.notebook)
            item.add_marker(pytest.mark.slow)



class _OneRunPerNotebook:
    """A notebook that ``tests/test_browser.py`` runs in JupyterLab (with nbval's output check) is not run a second
    time under nbval in the same session. Only when the browser tests are selected and a browser is here: without
    one they are skipped and nbval runs every notebook."""

    @pytest.hookimpl(trylast=True)  # after `-m` / `-k` have deselected what they deselect
    def pytest_collection_modifyitems(self, config, items):
        if not any(item.get_closest_marker("browser") for item in items):
            return
        from tests.lab import BROWSER_NOTEBOOKS, browser_missing

        if browser_missing() is not None:
            return
        twice = [i for i in items if str(i.fspath).endswith(".ipynb") and Path(str(i.fspath)).stem in BROWSER_NOTEBOOKS]
        if twice:
            items[:] = [i for i in items if i not in twice]
            config.hook.pytest_deselected(items=twice)
