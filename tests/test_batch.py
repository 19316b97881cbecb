"""legokit sweep / report (legokit.grid, .sweep, .collect, the cli): real papermill runs of
tests/notebooks/sweep_probe.ipynb (about a second per point).

The tests that execute the notebook (directly or through the ``two_point_sweep`` fixture) are marked ``notebook``;
the others check grids, names and reports without starting a kernel.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import yaml

from legokit import cli
from legokit.grid import expand_points, grid_hash, notebook_parameters, validate_points
from legokit.report import collect, flatten, point_status, report
from legokit.sweep import SweepResult, _check_kernel, summary_figure, sweep
from legokit.utils import LegokitError, atomic_write_json
from legokit.viz import plot_sweep_summary

PROBE = Path(__file__).parent / "notebooks" / "sweep_probe.ipynb"
GRID = {"base": {"PROFILE": "quick", "Y": 1.5}, "grid": {"X": [2, 3]}}


@pytest.fixture(scope="module")
def two_point_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SweepResult]:
    out = tmp_path_factory.mktemp("sweep") / "out"
    return out, sweep(PROBE, GRID, out, progress=False)


@pytest.mark.notebook
def test_two_point_grid_runs_through_papermill(two_point_sweep: tuple[Path, SweepResult]) -> None:
    out, res = two_point_sweep
    assert res.ok and res.ran == ["X=2", "X=3"] and res.skipped == []
    df = pd.read_csv(out / "results.csv")
    assert list(df["point"]) == ["X=2", "X=3"]
    assert list(df["x"]) == [2, 3] and list(df["y"]) == [1.5, 1.5] and list(df["product"]) == [3.0, 4.5]
    assert list(df["X"]) == [2, 3] and set(df["PROFILE"]) == {"quick"}
    pd.testing.assert_frame_equal(df, collect(out), check_dtype=False)
    assert res.summary_png == out / "summary.png" and res.summary_png.stat().st_size > 0
    # The executed notebook is kept, with the sweep's parameters injected (RUN_DIR = the point's directory).
    point = out / "points" / "X=3"
    executed = json.loads((point / "executed.ipynb").read_text())
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and f'RUN_DIR = "{point}"' in "".join(injected[0]["source"])
    assert "X=3 Y=1.5" in (point / "log.txt").read_text()  # the per-point log holds the notebook's output
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["notebook"] == str(PROBE.resolve()) and len(meta["grid_hash"]) == 16


@pytest.mark.notebook
def test_rerun_skips_finished_points(two_point_sweep: tuple[Path, SweepResult]) -> None:
    out, _ = two_point_sweep
    files = [out / "points" / n / f for n in ("X=2", "X=3") for f in ("results.json", "executed.ipynb")]
    before = [f.stat().st_mtime_ns for f in files]
    res = sweep(PROBE, GRID, out, progress=False)
    assert res.ok and res.ran == [] and res.skipped == ["X=2", "X=3"]
    assert [f.stat().st_mtime_ns for f in files] == before
    assert len(res.results) == 2


@pytest.mark.notebook
def test_different_grid_into_same_out_is_refused(two_point_sweep: tuple[Path, SweepResult]) -> None:
    out, _ = two_point_sweep
    other = {"base": {"PROFILE": "quick", "Y": 1.5}, "grid": {"X": [2, 3, 4]}}
    with pytest.raises(LegokitError, match=r"another grid.*new --out.*--force"):
        sweep(PROBE, other, out, progress=False)
    assert not (out / "points" / "X=4").exists()


@pytest.mark.notebook
def test_report_prints_sweep_and_run_tables(two_point_sweep: tuple[Path, SweepResult],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = two_point_sweep
    assert cli.main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 points, 2 done" in text and "results by X" in text and "4.5" in text
    assert cli.main(["report", str(out / "points" / "X=3")]) == 0
    text = capsys.readouterr().out
    assert "product" in text and "4.5" in text and "results.json" in text


@pytest.mark.notebook
def test_failing_point_is_recorded_and_the_others_finish(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    grid = {"base": {"PROFILE": "quick"}, "points": [{"X": 1}, {"X": 2, "FAIL": True}, {"X": 3}]}
    out = tmp_path / "out"
    res = sweep(PROBE, grid, out, progress=False)
    assert not res.ok and list(res.failed) == ["FAIL=true,X=2"]
    error = res.failed["FAIL=true,X=2"].read_text()
    assert "probe failure requested" in error and "executed.ipynb" in error
    assert (out / "points" / "FAIL=true,X=2" / "executed.ipynb").is_file()
    assert not (out / "points" / "FAIL=true,X=2" / "results.json").exists()
    assert list(pd.read_csv(out / "results.csv")["product"]) == [0.5, 1.5]
    assert point_status(out) == {"X=1": "done", "FAIL=true,X=2": "failed", "X=3": "done"}

    # The command line: finished points skip, the failing one reruns, fails again, exit code 1.
    grid_yaml = tmp_path / "grid.yaml"
    grid_yaml.write_text(yaml.safe_dump(grid))
    code = cli.main(["sweep", str(PROBE), "--grid", str(grid_yaml), "--out", str(out), "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert "2 skipped" in captured.out and "FAILED FAIL=true,X=2" in captured.err
    assert "failed: FAIL=true,X=2" in report(out)


@pytest.mark.parametrize(("grid", "pattern"), [
    ({"grid": {"Z": [1, 2]}}, r"'Z' is not a parameter .*PROFILE, RUN_DIR, X, Y, FAIL"),
    ({"grid": {"X": ["a"]}}, r"X='a' has type str.*X = 1 has type int"),
    ({"grid": {"X": [1.5]}}, r"X=1.5 has type float"),
    ({"grid": {"X": [True]}}, r"X=True has type bool"),
    ({"grid": {"FAIL": [0]}}, r"FAIL=0 has type int.*bool"),
    ({"grid": {"Y": ["1e-3"]}}, r"reads 1e-3 as a string"),
    ({"grid": {"RUN_DIR": ["/tmp"]}}, r"RUN_DIR is set by the sweep"),
    ({"grid": {"X": []}}, r"'X' has no values"),
    ({"grid": {"X": 1}}, r"expected a list of values"),
    ({}, r"grid is empty"),
    ({"base": {"X": 1}}, r"grid is empty"),
    ({"grids": {"X": [1]}}, r"unknown grid section"),
    ({"grid": {"X": [1]}, "summary": {"z": "X"}}, r"'summary' must be a mapping with keys x, y, hue"),
])
def test_bad_grid_fails_before_any_run(tmp_path: Path, grid: dict, pattern: str) -> None:
    with pytest.raises(LegokitError, match=pattern):
        sweep(PROBE, grid, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_int_accepted_for_float_parameter() -> None:
    points = expand_points({"grid": {"Y": [2, 0.25]}})
    validate_points(points, notebook_parameters(PROBE), PROBE)  # does not raise


def test_missing_notebook_and_grid_file(tmp_path: Path) -> None:
    with pytest.raises(LegokitError, match="not found"):
        sweep(tmp_path / "nope.ipynb", GRID, tmp_path / "out", progress=False)
    with pytest.raises(LegokitError, match="no notebook to run"):
        sweep(None, GRID, tmp_path / "out", progress=False)
    with pytest.raises(LegokitError, match="grid file .* does not exist"):
        sweep(PROBE, tmp_path / "nope.yaml", tmp_path / "out", progress=False)
    with pytest.raises(LegokitError, match="differs from the grid's notebook"):
        sweep(PROBE, {**GRID, "notebook": str(tmp_path / "other.ipynb")}, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_foreign_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a sweep")
    with pytest.raises(LegokitError, match="not a sweep directory"):
        sweep(PROBE, GRID, tmp_path, progress=False)


def test_points_are_named_and_expanded_deterministically() -> None:
    spec = {"base": {"PROFILE": "quick"}, "grid": {"SEED": [0, 1], "CONDITION": ["lego", "fed avg/x"]},
            "points": [{"CONDITION": "lego", "SEED": 0}, {"TASKS": ["boolq", "piqa"]}]}
    points = expand_points(spec)
    assert [p.name for p in points] == ["CONDITION=lego,SEED=0", "CONDITION=fed_avg_x,SEED=0",
                                        "CONDITION=lego,SEED=1", "CONDITION=fed_avg_x,SEED=1",
                                        'TASKS=boolq+piqa']  # the duplicate explicit point is kept once
    assert points[0].params == {"PROFILE": "quick", "SEED": 0, "CONDITION": "lego"}
    assert [p.name for p in expand_points(spec)] == [p.name for p in points]
    # Different parameters that sanitise to the same name are told apart by a hash suffix.
    clash = expand_points({"grid": {"C": ["a b", "a/b"]}})
    assert len({p.name for p in clash}) == 2 and all(p.name.startswith("C=a_b-") for p in clash)
    a, b = expand_points(GRID), expand_points({**GRID, "grid": {"X": [2, 4]}})
    assert grid_hash(PROBE, a) == grid_hash(PROBE, expand_points(GRID))
    assert grid_hash(PROBE, a) != grid_hash(PROBE, b)


def test_flatten_nested_results() -> None:
    flat = flatten({"global": {"mean_score": 0.5, "primary": {"boolq": 0.7}}, "curve": [1, 2], "n": 3})
    assert flat == {"global.mean_score": 0.5, "global.primary.boolq": 0.7, "curve": "[1, 2]", "n": 3}


def _fake_sweep(out: Path, scores: dict[tuple[str, int], float]) -> None:
    """A sweep directory written by hand: CONDITION x SEED points with a nested results.json each."""
    points = []
    for (cond, seed), score in scores.items():
        name = f"CONDITION={cond},SEED={seed}"
        points.append({"name": name, "keys": {"CONDITION": cond, "SEED": seed},
                       "params": {"PROFILE": "quick", "CONDITION": cond, "SEED": seed}})
        atomic_write_json(out / "points" / name / "results.json",
                          {"global": {"mean_score": score, "perplexity": 10 + seed}, "note": "x"})
    meta = {"grid_hash": "0" * 16, "notebook_name": "fake.ipynb", "defaults": {}, "points": points}
    (out / "sweep.json").write_text(json.dumps(meta))  # key order kept, as sweep() writes it


def test_report_groups_mean_std_over_seeds_and_plots(tmp_path: Path) -> None:
    _fake_sweep(tmp_path, {("lego", 0): 0.5, ("lego", 1): 0.7, ("fedavg", 0): 0.1, ("fedavg", 1): 0.3})
    df = collect(tmp_path)
    assert list(df.columns) == ["point", "PROFILE", "CONDITION", "SEED", "global.mean_score", "global.perplexity",
                                "note"]
    text = report(tmp_path)
    assert "mean ± std over SEED" in text
    lego = next(line for line in text.splitlines() if line.startswith("lego"))
    assert "0.6 ± 0.14" in lego and "10.5 ± 0.71" in lego  # mean and sample std over the two seeds
    params = ["PROFILE", "CONDITION", "SEED"]
    png = summary_figure(df, tmp_path / "summary.png", {"y": "global.mean_score"}, params)
    assert png == tmp_path / "summary.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the figure it writes: one bar per condition, its height the mean over the seeds
    (ax,) = plot_sweep_summary(df, {"y": "global.mean_score"}, params).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["lego", "fedavg"]
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.6, 0.2])
    assert ax.get_title() == "global.mean_score"


def test_report_of_a_lego_run_uses_results_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scores = {"primary": {"boolq": 0.625}, "mean_score": 0.625, "perplexity": 12.5}
    atomic_write_json(tmp_path / "results.json", {"base": scores, "global": scores})
    assert cli.main(["report", str(tmp_path / "results.json")]) == 0
    text = capsys.readouterr().out
    assert "base LLM" in text and "global LLM" in text and "62.5" in text
    # The generic report knows nothing of LEGO's layout: it prints the same results flat.
    flat = report(tmp_path)
    assert "base LLM" not in flat and "global.primary.boolq  0.625" in flat


def test_report_of_a_run_that_only_looks_like_lego_is_flat(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    atomic_write_json(tmp_path / "results.json", {"global": 3})
    assert cli.main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'results.json'}\n\nglobal  3\n"


def test_report_of_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LegokitError, match="neither a sweep directory"):
        report(tmp_path)


def test_kernel_runs_this_interpreter() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_kernel()

