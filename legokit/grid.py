"""Sweep grids: a grid YAML (or mapping) -> the points a sweep runs, checked against the notebook's parameters.

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

Point names come from the point's own keys (not ``base``), sorted: ``CONDITION=lego,SEED=0``, list values
joined by ``+``, made filesystem-safe. The grid hash covers the notebook's file name and every point's
parameters (not ``summary``). Running the points is :mod:`legokit.sweep`'s job.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from legokit.utils import LegokitError, read_yaml_mapping

GRID_KEYS = ("notebook", "base", "grid", "points", "summary")
SUMMARY_KEYS = ("x", "y", "hue")
RESERVED = ("RUN_DIR",)  # set by the sweep for every point


@dataclass
class SweepPoint:
    """One grid point: its directory name, its own keys (what names it) and its full parameters."""

    name: str
    keys: dict[str, Any]
    params: dict[str, Any]


def load_grid(grid: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """Read a grid (a YAML path or an already parsed mapping); return (spec, the YAML's path or None)."""
    if isinstance(grid, Mapping):
        spec, path = dict(grid), None
    else:
        path = Path(grid)
        spec = read_yaml_mapping(path, "grid file", "pass --grid sweeps/NAME.yaml",
                                 f"a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise LegokitError(f"unknown grid section(s) {', '.join(map(repr, unknown))}: use {', '.join(GRID_KEYS)}")
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


def resolve_notebook(notebook: str | Path | None, spec: Mapping[str, Any], grid_path: Path | None) -> Path:
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
            if key in RESERVED:
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


def summary_spec(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """The grid's ``summary`` section ({x, y, hue}; None: the defaults) with ``y`` as a list; else LegokitError."""
    summary = summary or {}
    if not isinstance(summary, dict) or set(summary) - set(SUMMARY_KEYS):
        raise LegokitError(f"grid 'summary' must be a mapping with keys {', '.join(SUMMARY_KEYS)}, got {summary!r}")
    y = summary.get("y")
    if isinstance(y, str):
        summary = {**summary, "y": [y]}
    return summary
