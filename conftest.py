"""Repository-wide pytest hooks: nbval's notebook items carry the `notebook` and `slow` markers, and the
test session runs without progress bars."""

import os

import pytest


def pytest_configure(config):
    # Notebook kernels inherit this environment. Under nbval a long cell that streams progress-bar widget
    # updates fills the kernel's ZeroMQ iopub queue (1000 messages) while nbval waits for the reply; the
    # "idle" message is then dropped and the cell fails with "Timeout of 5 seconds exceeded waiting for
    # output". No bars, no flood (legokit.utils.progress_bar; transformers' bars via huggingface_hub).
    os.environ.setdefault("LEGOKIT_PROGRESS", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.notebook)
            item.add_marker(pytest.mark.slow)
