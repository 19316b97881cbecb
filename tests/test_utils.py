"""Shared helpers: the progress-bar switch the notebook tests rely on."""

import io

import pytest

from legokit.utils import progress_bar


@pytest.mark.parametrize("value, disabled", [("0", True), ("off", True), ("1", False), (None, False)])
def test_legokit_progress_switch_overrides_the_caller(monkeypatch, value, disabled):
    if value is None:
        monkeypatch.delenv("LEGOKIT_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("LEGOKIT_PROGRESS", value)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with progress_bar(range(3), disable=False, file=io.StringIO()) as bar:
        assert bar.disable is disabled
        assert list(bar) == [0, 1, 2]  # a disabled bar still iterates
