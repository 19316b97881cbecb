"""Shared helpers: the progress-bar switch the notebook tests rely on, the YAML reader configs and grids share."""

import io

import pytest

from legokit.utils import LegokitError, progress_bar


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


def test_read_yaml_mapping_names_each_problem(tmp_path):
    from legokit.utils import read_yaml_mapping

    def read(text):
        p = tmp_path / "x.yaml"
        p.write_text(text)
        return read_yaml_mapping(p, "config file", "see configs/", "a mapping of sections")

    assert read("") == {} and read("a: 1\nb: [2]\n") == {"a": 1, "b": [2]}
    with pytest.raises(LegokitError, match=r"config file '.*nope.yaml' does not exist: see configs/"):
        read_yaml_mapping(tmp_path / "nope.yaml", "config file", "see configs/", "a mapping")
    with pytest.raises(LegokitError, match="is not valid YAML"):
        read("a: [1\n")
    with pytest.raises(LegokitError, match="must hold a mapping of sections, not list"):
        read("- 1\n- 2\n")
