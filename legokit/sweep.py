"""``legokit sweep``: run a parameterized notebook once per grid point with papermill, resume, record failures.

A sweep executes one notebook once per point of a grid (:mod:`legokit.grid`), keeps every executed notebook,
skips points that already finished, and collects the recorded results (:mod:`legokit.report`) into
``results.csv`` and ``summary.png`` (:func:`legokit.viz.plot_sweep_summary`).

Notebook convention (every legokit notebook): one cell tagged ``parameters`` of plain literals (among them
``PROFILE = "quick"`` and ``RUN_DIR = ""``); the last cell writes the headline numbers as JSON to
``RUN_DIR/results.json`` (nested dicts become dotted CSV columns, e.g. ``global.mean_score``).

Layout of ``OUT``::

    sweep.json                  grid hash, notebook, the points and their parameters
    points/<name>/              RUN_DIR of one point: executed.ipynb, log.txt, results.json or error.txt
                                (a results.json written before a later cell failed becomes results.partial.json)
    results.csv                 one row per finished point: its parameters, then its flattened results
    summary.png                 barplots of the headline numbers, error bars over the remaining keys (seeds)

A point whose ``results.json`` exists is finished and is skipped unless ``force``. An ``OUT`` written by a
different grid (another grid hash) is refused unless ``force`` (which also reruns every point). A point that
fails leaves ``error.txt`` (the traceback) next to its executed notebook; the others still run, and the command
exits 1 listing the failures. Each point runs in a fresh ``python3`` kernel (this interpreter) with the
notebook's folder as working directory, as in Jupyter; its output goes to ``log.txt``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from legokit.grid import (
    RESERVED,
    SweepPoint,
    expand_points,
    grid_hash,
    load_grid,
    notebook_parameters,
    resolve_notebook,
    summary_spec,
    validate_points,
)
from legokit.report import collect
from legokit.sweepdir import param_columns, sweep_meta
from legokit.utils import LegokitError, atomic_write_text, progress_bar, progress_write


@dataclass
class SweepResult:
    """What :func:`sweep` did. ``failed`` maps a point name to its ``error.txt``."""

    out: Path
    notebook: Path
    points: list[str]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, Path] = field(default_factory=dict)
    results: pd.DataFrame = field(default_factory=pd.DataFrame)
    results_csv: Path | None = None
    summary_png: Path | None = None

    @property
    def ok(self) -> bool:
        """True when no point failed."""
        return not self.failed


def _check_kernel() -> None:
    """Warn when the ``python3`` kernel would not run this interpreter (then the notebook sees another env)."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager  # optional dependency: only a sweep needs a kernel

        argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    except Exception as err:  # no kernelspec at all: papermill will say so with its own error
        warnings.warn(f"no python3 Jupyter kernel found ({err}); run `python -m ipykernel install --sys-prefix`",
                      stacklevel=3)
        return
    # jupyter_client swaps a bare "python"/"python3" for sys.executable; anything else is an absolute path.
    if argv0 in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        return
    if Path(argv0).parent != Path(sys.executable).parent:
        warnings.warn(f"the python3 kernel runs {argv0}, not this interpreter {sys.executable}: the notebooks "
                      f"may import another legokit. Reinstall the kernel from this environment "
                      f"(python -m ipykernel install --sys-prefix).", stacklevel=3)


def _claim_out(out: Path, meta: dict[str, Any], force: bool) -> None:
    """Write ``sweep.json``, refusing a directory that holds another grid's (or anything else's) results."""
    sweep_json = out / "sweep.json"
    if sweep_json.is_file():
        old = sweep_meta(out)
        if old.get("grid_hash") != meta["grid_hash"] and not force:
            raise LegokitError(f"{str(out)!r} holds the results of another grid (hash {old.get('grid_hash')} for "
                               f"{old.get('notebook_name')!r}, this grid is {meta['grid_hash']}): use a new --out, "
                               f"or --force to rerun every point into it")
        meta["created"] = old.get("created", meta["created"])
    elif out.is_dir() and any(out.iterdir()) and not force:
        raise LegokitError(f"{str(out)!r} exists and is not a sweep directory (no sweep.json): use a new --out, "
                           f"or --force to sweep into it anyway")
    # Not atomic_write_json: it sorts keys, and the grid's key order is the column order (x = first key).
    atomic_write_text(sweep_json, json.dumps(meta, indent=2, default=str) + "\n")


def sweep(notebook: str | Path | None, grid: str | Path | Mapping[str, Any], out: str | Path,
          force: bool = False, progress: bool = True) -> SweepResult:
    """Run ``notebook`` once per grid point with papermill and collect the results.

    Args:
        notebook: the notebook to run; None takes the grid's ``notebook``.
        grid: a grid YAML path or the same content as a mapping (format: :mod:`legokit.grid`).
        out: the sweep directory; each point runs with ``RUN_DIR = out/points/<name>``.
        force: rerun finished points, and accept an ``out`` written by another grid.
        progress: show a progress bar over the points.

    Returns:
        A :class:`SweepResult`; ``result.ok`` is False when a point failed (its ``error.txt`` is listed).
    """
    spec, grid_path = load_grid(grid)
    nb = resolve_notebook(notebook, spec, grid_path)
    points = expand_points(spec)
    defaults = notebook_parameters(nb)
    validate_points(points, defaults, nb)
    summary_spec(spec.get("summary"))  # a malformed summary section fails now, not after hours of runs
    _check_kernel()

    out = Path(out).resolve()
    meta = {"grid_hash": grid_hash(nb, points), "notebook": str(nb), "notebook_name": nb.name,
            "grid_file": str(grid_path.resolve()) if grid_path else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": spec.get("summary") or {},
            # the notebook's defaults fill the parameters a point leaves out (in results.csv, not in the hash)
            "defaults": {k: v for k, v in defaults.items() if v is not ... and k not in RESERVED},
            "points": [{"name": p.name, "keys": p.keys, "params": p.params} for p in points]}
    _claim_out(out, meta, force)

    result = SweepResult(out=out, notebook=nb, points=[p.name for p in points])
    todo = []
    for p in points:
        if (out / "points" / p.name / "results.json").is_file() and not force:
            result.skipped.append(p.name)
        else:
            todo.append(p)

    bar = progress_bar(todo, desc=f"sweep {nb.stem}", unit="point", disable=not progress or not todo)
    for p in bar:
        bar.set_postfix_str(p.name)
        err = run_point(nb, p, out / "points" / p.name)
        result.ran.append(p.name)
        if err is not None:
            result.failed[p.name] = err
            progress_write(f"legokit sweep: point {p.name} FAILED, see {err}", file=sys.stderr)

    result.results = collect(out)
    result.results_csv = out / "results.csv"
    atomic_write_text(result.results_csv, result.results.to_csv(index=False))
    result.summary_png = summary_figure(result.results, out / "summary.png", spec.get("summary"),
                                        param_columns(meta))
    return result


def run_point(notebook: Path, point: SweepPoint, run_dir: Path) -> Path | None:
    """Execute one point into ``run_dir``; return None on success, else the path of its ``error.txt``."""
    import papermill  # heavy optional dependency: only a sweep executes notebooks

    run_dir.mkdir(parents=True, exist_ok=True)
    # A rerun must not leave a stale verdict behind if it dies half-way.
    for stale in ("results.json", "results.partial.json", "error.txt"):
        (run_dir / stale).unlink(missing_ok=True)
    executed = run_dir / "executed.ipynb"
    params = {**point.params, "RUN_DIR": str(run_dir)}
    t0 = time.time()
    try:
        with open(run_dir / "log.txt", "w") as log:
            # cwd = the notebook's folder, as in Jupyter, so the notebook's relative paths keep working.
            # The kernel's own log_level=ERROR: its transport warnings would otherwise break the progress bar.
            papermill.execute_notebook(str(notebook), str(executed), parameters=params, kernel_name="python3",
                                       progress_bar=False, stdout_file=log, stderr_file=log,
                                       cwd=str(notebook.parent), extra_arguments=["--IPKernelApp.log_level=ERROR"])
        if not (run_dir / "results.json").is_file():
            raise LegokitError(f"the notebook finished but wrote no {run_dir / 'results.json'}: its last cell "
                               f"must record the results to RUN_DIR/results.json")
    except Exception as err:  # a failing point is recorded; the other points still run
        text = str(err) if isinstance(err, papermill.PapermillExecutionError) else traceback.format_exc()
        error_txt = run_dir / "error.txt"
        partial = run_dir / "results.json"
        if partial.is_file():  # written before a later cell failed: not a finished point
            partial.replace(run_dir / "results.partial.json")
        atomic_write_text(error_txt, f"point {point.name} failed after {time.time() - t0:.1f} s\n"
                                     f"parameters: {json.dumps(params, sort_keys=True)}\n"
                                     f"executed notebook: {executed}\n\n{text}\n")
        return error_txt
    return None


def summary_figure(df: pd.DataFrame, path: Path, summary: Mapping[str, Any] | None,
                   params: list[str]) -> Path | None:
    """Write :func:`legokit.viz.plot_sweep_summary`'s figure to ``path``; None (nothing written) if nothing to plot.

    Args:
        df: :func:`legokit.report.collect`'s table.
        path: where to write the PNG.
        summary: the grid's ``summary`` section ({x, y, hue}), or None for the defaults.
        params: the parameter columns of ``df`` (every other numeric column is a result).
    """
    from legokit.viz import plot_sweep_summary  # matplotlib only when a sweep draws

    fig = plot_sweep_summary(df, summary, params)
    if fig is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
