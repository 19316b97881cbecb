"""Repository-wide pytest hooks: nbval's notebook items carry the `notebook` and `slow` markers."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.notebook)
            item.add_marker(pytest.mark.slow)
