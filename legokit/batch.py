"""Batch runs of parameterized notebooks: ``legokit sweep`` and ``legokit report``.

A sweep executes one notebook once per grid point with papermill, keeps every executed notebook, skips
points that already finished, and collects the recorded results into ``results.csv`` and ``summary.png``.

Notebook convention (every legokit notebook): one cell tagged ``parameters`` of plain literals (among them
``PROFILE = "quick"`` and ``RUN_DIR = ""``); the last cell writes the headline numbers as JSON to
``RUN_DIR/results.json`` (nested dicts become dotted CSV columns, e.g. ``global.mean_score``).

Grid file (YAML)::

    notebook: notebooks/04_lego_experiment.ipynb  # optional; relative to the current directory, then to
                                                  # this file. A notebook given on the command line must match.
    base: {PROFILE: quick}                        # parameters common to every point (optional)
    grid:                                         # cartesian product, in this key order
      CONDITION: [lego, fedavg]                   # every value is a list of values; a list-valued parameter
      SEED: [0, 1, 2]                             #   is a list of lists: TASKS: [[boolq, piqa]]
    points:                                       # optional explicit points, in addition to (or instead of)
      - {CONDITION: centralized, SEED: 0}         #   the grid; each one is laid over ``base``
    summary:                                      # optional, only shapes summary.png
      x: CONDITION                                # default: the first varying key that is not a seed
      y: [global.mean_score, global.perplexity]   # default: the first few numeric result columns
      hue: null                                   # default: the next varying non-seed key, if any

Rules, checked before anything runs (each a :class:`~legokit.utils.LegokitError`): every key must be a
parameter of the notebook; a value must have the type of the parameter's default (an int is accepted for a
float; a ``None`` default accepts anything; PyYAML reads ``1e-3`` as a string, write ``1.0e-3``); ``RUN_DIR``
is set by the sweep and may not appear in the grid; the grid must hold at least one point.

Layout of ``OUT``::

    sweep.json                  grid hash, notebook, the points and their parameters
    points/<name>/              RUN_DIR of one point: executed.ipynb, log.txt, results.json or error.txt
                                (a results.json written before a later cell failed becomes results.partial.json)
    results.csv                 one row per finished point: its parameters, then its flattened results
    summary.png                 barplots of the headline numbers, error bars over the remaining keys (seeds)

Point names come from the point's own keys (not ``base``), sorted: ``CONDITION=lego,SEED=0``, list values
joined by ``+``, made filesystem-safe. A point whose ``results.json`` exists is finished and is skipped unless
``force``. The grid hash covers the notebook's file name and every point's parameters (not ``summary``); an
``OUT`` written by a different grid is refused unless ``force`` (which also reruns every point). A point that
fails leaves ``error.txt`` (the traceback) next to its executed notebook; the others still run, and the command
exits 1 listing the failures. Each point runs in a fresh ``python3`` kernel (this interpreter) with the
notebook's folder as working directory, as in Jupyter; its output goes to ``log.txt``.

Python API: ``sweep(notebook, grid, out, force=False, progress=True) -> SweepResult``, ``collect(out) ->
DataFrame`` (the rows of results.csv), ``report(path) -> str`` (what ``legokit report`` prints).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import json
import math
import re
import sys
import time
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from legokit.utils import LegokitError, atomic_write_text, progress_bar, progress_write

_GRID_KEYS = ("notebook", "base", "grid", "points", "summary")
_SUMMARY_KEYS = ("x", "y", "hue")
_RESERVED = ("RUN_DIR",)  # set by the sweep for every point
_MAX_SUMMARY_PANELS = 4


@dataclass
class SweepPoint:
    """One grid point: its directory name, its own keys (what names it) and its full parameters."""

    name: str
    keys: dict[str, Any]
    params: dict[str, Any]


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


# ----------------------------------------------------------------------------------------------- grid parsing


def load_grid(grid: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """Read a grid (a YAML path or an already parsed mapping); return (spec, the YAML's path or None)."""
    if isinstance(grid, Mapping):
        spec, path = dict(grid), None
    else:
        path = Path(grid)
        if not path.is_file():
            raise LegokitError(f"grid file {str(path)!r} not found: pass --grid sweeps/NAME.yaml")
        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise LegokitError(f"grid file {str(path)!r} is not valid YAML: {err}") from err
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise LegokitError(f"grid file {str(path)!r} must be a mapping with keys {', '.join(_GRID_KEYS)}")
    unknown = sorted(set(spec) - set(_GRID_KEYS))
    if unknown:
        raise LegokitError(f"unknown grid section(s) {', '.join(map(repr, unknown))}: use {', '.join(_GRID_KEYS)}")
    return spec, path


def expand_points(spec: Mapping[str, Any]) -> list[SweepPoint]:
    """The points of a grid spec: the cartesian product of ``grid`` then the explicit ``points``, over ``base``.

    Identical points are kept once. Raises LegokitError on an empty grid or a malformed section.
    """
    base = spec.get("base") or {}
    grid = spec.get("grid") or {}
    extra = spec.get("points") or []
    if not isinstance(base, dict):
        raise LegokitError(f"grid 'base' must be a mapping of parameter: value, got {base!r}")
    if not isinstance(grid, dict):
        raise LegokitError(f"grid 'grid' must be a mapping of parameter: [values], got {grid!r}")
    if not isinstance(extra, list) or not all(isinstance(p, dict) for p in extra):
        raise LegokitError(f"grid 'points' must be a list of mappings (parameter: value), got {extra!r}")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise LegokitError(f"grid key {key!r}: expected a list of values, got {values!r} "
                               f"(a fixed value goes in 'base'; a list-valued parameter is a list of lists)")
        if not values:
            raise LegokitError(f"grid key {key!r} has no values, so the grid is empty: give at least one value")
    combos = [dict(zip(grid, vals, strict=True)) for vals in itertools.product(*grid.values())] if grid else []
    own = combos + [dict(p) for p in extra]
    if not own:
        raise LegokitError("the grid is empty: give a 'grid' of parameter: [values] and/or a list of 'points'")

    points, seen = [], set()
    for keys in own:
        params = {**base, **keys}
        canon = _canonical(params)
        if canon not in seen:
            seen.add(canon)
            points.append(SweepPoint(_point_name(keys), keys, params))
    # Two different points that sanitise to the same name get a short hash of their parameters.
    names = [p.name for p in points]
    for p in points:
        if names.count(p.name) > 1:
            p.name = f"{p.name}-{hashlib.sha256(_canonical(p.params).encode()).hexdigest()[:8]}"
    return points


def _point_name(keys: Mapping[str, Any], max_len: int = 120) -> str:
    """``{"SEED": 0, "CONDITION": "lego"}`` -> ``CONDITION=lego,SEED=0``, safe as a directory name."""
    if not keys:
        return "base"
    parts = [f"{k}={_render(keys[k])}" for k in sorted(keys)]
    name = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", ",".join(parts)).strip("._") or "point"
    if len(name) > max_len:
        name = f"{name[:max_len - 9]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


def _render(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return "+".join(map(_render, v))  # TASKS=[boolq, piqa] -> TASKS=boolq+piqa
    return json.dumps(v, sort_keys=True)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def grid_hash(notebook: Path, points: list[SweepPoint]) -> str:
    """A short hash of what a sweep directory holds: the notebook's file name and every point's parameters."""
    payload = {"notebook": notebook.name, "points": {p.name: p.params for p in points}}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- validation


def _resolve_notebook(notebook: str | Path | None, spec: Mapping[str, Any], grid_path: Path | None) -> Path:
    """The notebook to run: the argument, else the grid's ``notebook``; both given must be the same file."""
    from_grid = None
    if spec.get("notebook"):
        cand = Path(spec["notebook"])
        if not cand.is_absolute() and not cand.exists() and grid_path is not None:
            cand = grid_path.parent / cand  # relative to the grid file when not relative to the current dir
        from_grid = cand
    if notebook is None and from_grid is None:
        raise LegokitError("no notebook to run: pass NOTEBOOK or set 'notebook:' in the grid file")
    nb = Path(notebook) if notebook is not None else Path(from_grid)  # type: ignore[arg-type]
    if not nb.is_file():
        raise LegokitError(f"notebook {str(nb)!r} not found")
    if from_grid is not None and (not from_grid.exists() or from_grid.resolve() != nb.resolve()):
        raise LegokitError(f"notebook {str(nb)!r} differs from the grid's notebook {str(spec['notebook'])!r}: "
                           f"drop one of them or make them agree")
    return nb.resolve()


def notebook_parameters(notebook: str | Path) -> dict[str, Any]:
    """The notebook's ``parameters`` cell as {name: default value}; an unparsable default maps to ``...``."""
    import papermill

    try:
        found = papermill.inspect_notebook(str(notebook))
    except Exception as err:  # papermill raises bare exceptions for unreadable notebooks
        raise LegokitError(f"cannot read notebook {str(notebook)!r}: {err}") from err
    if not found:
        raise LegokitError(f"notebook {str(notebook)!r} has no cell tagged 'parameters': tag the cell of "
                           f"plain literals (PROFILE, RUN_DIR, ...) with 'parameters'")
    params = {}
    for name, info in found.items():
        try:
            params[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError, TypeError):
            params[name] = ...  # not a literal: no type to check against
    return params


def _type_ok(value: Any, default: Any) -> bool:
    if default is ... or default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):  # bool is an int subclass: keep them apart
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def validate_points(points: list[SweepPoint], defaults: Mapping[str, Any], notebook: Path) -> None:
    """Every key a parameter of the notebook, every value of its default's type; else LegokitError."""
    if "RUN_DIR" not in defaults:
        raise LegokitError(f"notebook {notebook.name!r} has no RUN_DIR parameter: add RUN_DIR = \"\" to its "
                           f"parameters cell and write results.json there")
    names = ", ".join(defaults)
    for p in points:
        for key, value in p.params.items():
            if key in _RESERVED:
                raise LegokitError(f"{key} is set by the sweep for every point (OUT/points/<name>/): "
                                   f"remove it from the grid")
            if key not in defaults:
                raise LegokitError(f"grid key {key!r} is not a parameter of {notebook.name!r}; "
                                   f"its parameters are: {names}")
            default = defaults[key]
            if not _type_ok(value, default):
                hint = ""
                if isinstance(value, str) and isinstance(default, (int, float)) and _is_number(value):
                    hint = f" (PyYAML reads {value} as a string: write it with a dot, e.g. 1.0e-3)"
                raise LegokitError(f"grid value {key}={value!r} has type {type(value).__name__}, but the notebook's "
                                   f"default {key} = {default!r} has type {type(default).__name__}{hint}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_kernel() -> None:
    """Warn when the ``python3`` kernel would not run this interpreter (then the notebook sees another env)."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

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
        old = _sweep_meta(out)
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


# ----------------------------------------------------------------------------------------------- execution


def sweep(notebook: str | Path | None, grid: str | Path | Mapping[str, Any], out: str | Path,
          force: bool = False, progress: bool = True) -> SweepResult:
    """Run ``notebook`` once per grid point with papermill and collect the results.

    Args:
        notebook: the notebook to run; None takes the grid's ``notebook``.
        grid: a grid YAML path or the same content as a mapping (format: this module's docstring).
        out: the sweep directory; each point runs with ``RUN_DIR = out/points/<name>``.
        force: rerun finished points, and accept an ``out`` written by another grid.
        progress: show a progress bar over the points.

    Returns:
        A :class:`SweepResult`; ``result.ok`` is False when a point failed (its ``error.txt`` is listed).
    """
    spec, grid_path = load_grid(grid)
    nb = _resolve_notebook(notebook, spec, grid_path)
    points = expand_points(spec)
    defaults = notebook_parameters(nb)
    validate_points(points, defaults, nb)
    _summary_spec(spec)  # a malformed summary section fails now, not after hours of runs
    _check_kernel()

    out = Path(out).resolve()
    meta = {"grid_hash": grid_hash(nb, points), "notebook": str(nb), "notebook_name": nb.name,
            "grid_file": str(grid_path.resolve()) if grid_path else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": spec.get("summary") or {},
            # the notebook's defaults fill the parameters a point leaves out (in results.csv, not in the hash)
            "defaults": {k: v for k, v in defaults.items() if v is not ... and k not in _RESERVED},
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
                                        _param_columns(meta))
    return result


def run_point(notebook: Path, point: SweepPoint, run_dir: Path) -> Path | None:
    """Execute one point into ``run_dir``; return None on success, else the path of its ``error.txt``."""
    import papermill

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


# ----------------------------------------------------------------------------------------------- collection


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"global": {"ppl": 3}}`` -> ``{"global.ppl": 3}``; lists become JSON strings (one CSV cell)."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            flat[key] = json.dumps(v)
        else:
            flat[key] = v
    return flat


def _sweep_meta(out: Path) -> dict[str, Any]:
    path = out / "sweep.json"
    if not path.is_file():
        raise LegokitError(f"{str(out)!r} is not a sweep directory (no sweep.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LegokitError(f"{path} is not valid JSON ({err}): delete it and sweep again, or use a new --out") from err


def point_status(out: str | Path) -> dict[str, str]:
    """{point name: "done" | "failed" | "pending"} for every point of the sweep in ``out``."""
    out = Path(out)
    status = {}
    for p in _sweep_meta(out)["points"]:
        d = out / "points" / p["name"]
        status[p["name"]] = ("done" if (d / "results.json").is_file()
                             else "failed" if (d / "error.txt").is_file() else "pending")
    return status


def collect(out: str | Path) -> pd.DataFrame:
    """One row per finished point of the sweep in ``out``: ``point``, its parameters, its flattened results.

    A result key that clashes with a parameter name is prefixed ``results.``.
    """
    out = Path(out)
    meta = _sweep_meta(out)
    defaults = meta.get("defaults", {})
    rows = []
    for p in meta["points"]:
        res_path = out / "points" / p["name"] / "results.json"
        if not res_path.is_file():
            continue
        try:
            res = json.loads(res_path.read_text())
        except json.JSONDecodeError as err:
            raise LegokitError(f"{res_path} is not valid JSON ({err}): rerun the point with --force") from err
        if not isinstance(res, dict):
            raise LegokitError(f"{res_path} must hold a JSON object (a dict of results), got {type(res).__name__}")
        params = {k: p["params"].get(k, defaults.get(k)) for k in _param_columns(meta)}
        row = {"point": p["name"], **{k: _cell(v) for k, v in params.items()}}
        for k, v in flatten(res).items():
            row[f"results.{k}" if k in row else k] = v
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _param_columns(meta: Mapping[str, Any]) -> list[str]:
    """Every parameter the grid names (base, grid, points), in first-seen order."""
    keys: list[str] = []
    for p in meta["points"]:
        keys += [k for k in p["params"] if k not in keys]
    return keys


def _varying(df: pd.DataFrame, params: list[str]) -> list[str]:
    """The parameters whose value differs between the rows of ``df``."""
    return [k for k in params if k in df.columns and df[k].astype(str).nunique() > 1]


def _is_seed(key: str) -> bool:
    return "seed" in key.lower()


def _result_columns(df: pd.DataFrame, param_keys: list[str]) -> list[str]:
    """Numeric result columns (not a parameter, not the point name)."""
    skip = {"point", *param_keys}
    return [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])
            and not pd.api.types.is_bool_dtype(df[c])]


# ----------------------------------------------------------------------------------------------- summary figure


def _summary_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    summary = spec.get("summary") or {}
    if not isinstance(summary, dict) or set(summary) - set(_SUMMARY_KEYS):
        raise LegokitError(f"grid 'summary' must be a mapping with keys {', '.join(_SUMMARY_KEYS)}, got {summary!r}")
    y = summary.get("y")
    if isinstance(y, str):
        summary = {**summary, "y": [y]}
    return summary


def summary_figure(df: pd.DataFrame, path: Path, summary: Mapping[str, Any] | None,
                   params: list[str]) -> Path | None:
    """Barplots (mean, error bar = std over the remaining keys) of the headline results; None if nothing to plot.

    Args:
        df: :func:`collect`'s table.
        path: where to write the PNG.
        summary: the grid's ``summary`` section ({x, y, hue}), or None for the defaults.
        params: the parameter columns of ``df`` (every other numeric column is a result).
    """
    import seaborn as sns
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone, renders with Agg

    summary = _summary_spec({"summary": summary})
    if df.empty:
        return None
    varying = _varying(df, params)
    candidates = [k for k in varying if not _is_seed(k)] or varying
    x = summary.get("x") or (candidates[0] if candidates else None)
    hue = summary.get("hue") or next((k for k in candidates if k != x), None)
    numeric = _result_columns(df, params)
    changing = [c for c in numeric if df[c].nunique() > 1]  # constant columns make dull panels
    ys = list(summary.get("y") or (changing or numeric)[:_MAX_SUMMARY_PANELS])
    missing = [c for c in ys if c not in df.columns]
    if missing:
        warnings.warn(f"summary y column(s) {missing} are not in results.csv (columns: {list(df.columns)})",
                      stacklevel=2)
        ys = [c for c in ys if c in df.columns]
    for key in (x, hue):
        if key is not None and key not in df.columns:
            warnings.warn(f"summary key {key!r} is not a column of results.csv; plotting without it", stacklevel=2)
    x = x if x in df.columns else None
    hue = hue if hue in df.columns and hue != x else None
    if not ys:
        return None

    plot = df.copy()
    for key in (x, hue):
        if key is not None:
            plot[key] = plot[key].astype(str)  # categorical axes, even for numeric keys
    fig = Figure(figsize=(4.2 * len(ys), 3.6), layout="constrained")
    axes = fig.subplots(1, len(ys), squeeze=False)[0]
    for ax, y in zip(axes, ys, strict=True):
        sns.barplot(data=plot, x=x, y=y, hue=hue, errorbar="sd", capsize=0.15, ax=ax)
        ax.set_title(y)
        ax.set_ylabel("")
    rest = [k for k in varying if k not in (x, hue)]
    fig.suptitle(f"mean ± std over {', '.join(rest)}" if rest else "one run per bar", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------------------------- report


def report(path: str | Path) -> str:
    """A plain-text report of a sweep directory (grouped mean ± std) or of one run directory (results.json)."""
    path = Path(path)
    if path.is_file() and path.name == "results.json":
        path = path.parent
    if (path / "sweep.json").is_file():
        return _sweep_report(path)
    if (path / "results.json").is_file():
        return _run_report(path / "results.json")
    raise LegokitError(f"{str(path)!r} is neither a sweep directory (sweep.json) nor a run directory "
                       f"(results.json)")


def _run_report(results_json: Path) -> str:
    try:
        results = json.loads(results_json.read_text())
    except json.JSONDecodeError as err:
        raise LegokitError(f"{results_json} is not valid JSON: {err}") from err
    if isinstance(results, dict) and ("base" in results or "global" in results):
        from legokit.experiment import results_table

        try:
            return f"{results_json}\n\n{results_table(results)}"
        except (KeyError, TypeError):
            pass  # not a LEGO run's layout after all: print it flat below
    flat = flatten(results) if isinstance(results, dict) else {"value": results}
    width = max((len(k) for k in flat), default=0)
    lines = [f"{k:{width}s}  {_fmt(v)}" for k, v in flat.items()]
    return f"{results_json}\n\n" + "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _mean_std(s: pd.Series) -> str:
    s = s.dropna()
    if s.empty:
        return "-"
    if len(s) == 1 or math.isnan(s.std()):
        return f"{s.mean():.4g}"
    return f"{s.mean():.4g} ± {s.std():.2g}"


def _sweep_report(out: Path) -> str:
    meta = _sweep_meta(out)
    status = point_status(out)
    df = collect(out)
    params = _param_columns(meta)
    varying = _varying(df, params)
    done = sum(s == "done" for s in status.values())
    lines = [f"sweep {out}: {meta['notebook_name']}, {len(status)} points, {done} done "
             f"(grid {meta['grid_hash']})"]
    for st in ("failed", "pending"):
        names = [n for n, s in status.items() if s == st]
        if names:
            lines.append(f"{st}: {', '.join(names)}")
    if df.empty:
        return "\n".join([*lines, "", "(no finished points yet)"])

    metrics = _result_columns(df, params)
    groups = [k for k in varying if not _is_seed(k)]
    seeds = [k for k in varying if _is_seed(k)]
    if groups:
        grouped = df.groupby(groups, sort=False, dropna=False)
        table = grouped[metrics].agg(_mean_std)
        n = grouped.size().rename("n")
        table = pd.concat([n, table], axis=1)
    else:
        table = df[metrics].agg(_mean_std).to_frame("all").T
        table.insert(0, "n", len(df))
    # Many metrics read better as rows (one column per group) than as one very wide line.
    if len(metrics) > 6:
        table = table.T
    over = f" (mean ± std over {', '.join(seeds)})" if seeds else ""
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 10_000):
        lines += ["", f"results by {', '.join(groups) or 'all points'}{over}:", table.to_string()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- command line


def _cmd_sweep(args: argparse.Namespace) -> int:
    out = args.out or f"runs/sweep-{Path(args.grid).stem}"
    res = sweep(args.notebook, args.grid, out, force=args.force, progress=not args.no_progress)
    print(f"legokit sweep: {len(res.points)} points: {len(res.ran) - len(res.failed)} finished now, "
          f"{len(res.skipped)} skipped (finished before), {len(res.failed)} failed")
    print(f"results: {res.results_csv} ({len(res.results)} rows)"
          + (f"; summary: {res.summary_png}" if res.summary_png else ""))
    if res.failed:
        for name, err in res.failed.items():
            print(f"  FAILED {name}: {err}", file=sys.stderr)
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> None:
    print(report(args.path))


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``sweep`` and ``report`` to the ``legokit`` command's subparsers."""
    s = sub.add_parser("sweep", help="run a notebook once per grid point (papermill) and collect results.csv")
    s.add_argument("notebook", nargs="?", default=None, help="the notebook (default: the grid file's 'notebook')")
    s.add_argument("--grid", required=True, help="the grid YAML, e.g. sweeps/NAME.yaml")
    s.add_argument("--out", default=None, help="the sweep directory (default: runs/sweep-<grid name>)")
    s.add_argument("--force", action="store_true",
                   help="rerun finished points, and sweep into a directory written by another grid")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_sweep)

    s = sub.add_parser("report", help="print the results of a sweep directory or of one run directory")
    s.add_argument("path", help="a sweep directory (sweep.json) or a run directory (results.json)")
    s.set_defaults(func=_cmd_report)
