"""Shared helpers: the progress-bar switch the notebook tests rely on, the YAML reader configs and grids share."""

import io
import subprocess
import sys
from pathlib import Path

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


_HEAP_PROBE = """
import sys, torch
from legokit.utils import heap_mode, lean_heap
if sys.argv[1] == "lean":
    lean_heap()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
warm = torch.ones(1 << 20)  # a freed 4 MiB buffer: glibc's default heap then keeps buffers up to 4 MiB
del warm
big, small = [], []
for i in range(120):  # 2 MiB buffers with small long-lived tensors between them, as in a training step
    big.append(torch.ones(512 * 1024))
    small.append(torch.ones(64 * 1024))  # 256 KiB
before = rss()
del big
print(heap_mode(), before - rss())
"""


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads Linux's /proc to measure resident memory")
def test_lean_heap_hands_freed_buffers_back_and_names_itself():
    """The default glibc heap keeps 240 MiB of freed 2 MiB buffers pinned by small live tensors between them;
    the lean heap hands them back at once. Each heap in its own process (mallopt is process-wide)."""
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True)
        label, freed = out.stdout.rsplit(maxsplit=1)
        return label, float(freed)

    default_label, default_freed = probe("default")
    lean_label, lean_freed = probe("lean")
    assert default_label == "default" and lean_label.startswith("lean")
    assert lean_freed > 200, lean_freed  # 120 x 2 MiB handed back
    assert default_freed < 50, default_freed  # kept in the heap: this is what lean_heap is for


def test_lean_heap_refuses_a_bad_threshold():
    from legokit.utils import lean_heap

    with pytest.raises(LegokitError, match="positive"):
        lean_heap(0)
