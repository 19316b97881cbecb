"""Reading a sweep directory back: its ``sweep.json``, its points with their parameters, and which are seeds.

A sweep directory (written by :mod:`legokit.sweep`) holds ``sweep.json`` (grid hash, notebook, the points and their
parameters, the notebook's defaults) and ``points/<name>/`` per point: its ``RUN_DIR``, finished when it holds a
``results.json``. This module is the one reader of that layout: :mod:`legokit.report` (``results.csv``, ``legokit
report``) and ``claims.load_sweep`` (LEGO's conditions pooled over seeds) both read through it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from legokit.utils import LegokitError


@dataclass(frozen=True)
class Point:
    """One point of a sweep: ``name``, its run directory ``dir``, and ``params`` (the point's own parameters, the
    notebook's defaults filling those it leaves out)."""

    name: str
    dir: Path
    params: dict[str, Any]

    @property
    def status(self) -> str:
        """``"done"`` (a ``results.json``), ``"failed"`` (an ``error.txt``) or ``"pending"``."""
        if (self.dir / "results.json").is_file():
            return "done"
        return "failed" if (self.dir / "error.txt").is_file() else "pending"


def sweep_meta(out: Path) -> dict[str, Any]:
    """The parsed ``sweep.json`` of the sweep directory ``out``; LegokitError when there is none or it is not JSON."""
    path = Path(out) / "sweep.json"
    if not path.is_file():
        raise LegokitError(f"{str(out)!r} is not a sweep directory (no sweep.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LegokitError(f"{path} is not valid JSON ({err}): delete it and sweep again, or use a new --out") from err


def sweep_points(out: str | Path, meta: Mapping[str, Any] | None = None) -> list[Point]:
    """Every point of the sweep in ``out``, in the grid's order (``meta``: its ``sweep_meta``, read when None)."""
    out = Path(out)
    meta = sweep_meta(out) if meta is None else meta
    defaults = meta.get("defaults", {})
    return [Point(p["name"], out / "points" / p["name"], {**defaults, **p["params"]}) for p in meta["points"]]


def param_columns(meta: Mapping[str, Any]) -> list[str]:
    """Every parameter the grid names (base, grid, points), in first-seen order."""
    keys: list[str] = []
    for p in meta["points"]:
        keys += [k for k in p["params"] if k not in keys]
    return keys


def is_seed(key: str) -> bool:
    """A seed parameter (its name contains ``seed``): results are pooled or averaged over it, never grouped by it."""
    return "seed" in key.lower()
