"""Reading sweep and run directories back: results.csv rows, point status, and ``legokit report``'s text.

Every legokit notebook writes its headline numbers as JSON to ``RUN_DIR/results.json``; nested dicts become
dotted columns (``global.mean_score``). A sweep directory (written by :mod:`legokit.sweep`) is read through
:mod:`legokit.sweepdir` (its points, their parameters, which are seeds).

Nothing here knows what a particular notebook records: a run directory is reported as its flattened
``results.json``; a sweep as the mean ± std of every numeric result, grouped by the parameters that vary, over
the seeds (a parameter whose name contains ``seed``). ``legokit report`` lays LEGO's own tables over this.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from legokit.sweepdir import is_seed, param_columns, sweep_meta, sweep_points
from legokit.utils import LegokitError


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


def point_status(out: str | Path) -> dict[str, str]:
    """{point name: "done" | "failed" | "pending"} for every point of the sweep in ``out``."""
    return {p.name: p.status for p in sweep_points(out)}


def collect(out: str | Path) -> pd.DataFrame:
    """One row per finished point of the sweep in ``out``: ``point``, its parameters, its flattened results.

    A result key that clashes with a parameter name is prefixed ``results.``.
    """
    meta = sweep_meta(Path(out))
    columns = param_columns(meta)
    rows = []
    for p in sweep_points(out, meta):
        res_path = p.dir / "results.json"
        if not res_path.is_file():
            continue
        try:
            res = json.loads(res_path.read_text())
        except json.JSONDecodeError as err:
            raise LegokitError(f"{res_path} is not valid JSON ({err}): rerun the point with --force") from err
        if not isinstance(res, dict):
            raise LegokitError(f"{res_path} must hold a JSON object (a dict of results), got {type(res).__name__}")
        row = {"point": p.name, **{k: _cell(p.params.get(k)) for k in columns}}
        for k, v in flatten(res).items():
            row[f"results.{k}" if k in row else k] = v
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def varying_params(df: pd.DataFrame, params: list[str]) -> list[str]:
    """The parameters whose value differs between the rows of ``df``."""
    return [k for k in params if k in df.columns and df[k].astype(str).nunique() > 1]


def result_columns(df: pd.DataFrame, param_keys: list[str]) -> list[str]:
    """Numeric result columns (not a parameter, not the point name)."""
    skip = {"point", *param_keys}
    return [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])
            and not pd.api.types.is_bool_dtype(df[c])]


def locate(path: str | Path) -> tuple[str, Path]:
    """What ``path`` holds: ``("sweep", the sweep directory)`` or ``("run", its results.json)``.

    ``path`` is a sweep directory, a run directory or a ``results.json``; anything else is a LegokitError.
    """
    path = Path(path)
    if path.is_file() and path.name == "results.json":
        path = path.parent
    if (path / "sweep.json").is_file():
        return "sweep", path
    if (path / "results.json").is_file():
        return "run", path / "results.json"
    raise LegokitError(f"{str(path)!r} is neither a sweep directory (sweep.json) nor a run directory "
                       f"(results.json)")


def read_results(results_json: Path) -> Any:
    """A run's ``results.json``, parsed; LegokitError when it is not JSON."""
    try:
        return json.loads(results_json.read_text())
    except json.JSONDecodeError as err:
        raise LegokitError(f"{results_json} is not valid JSON: {err}") from err


def report(path: str | Path) -> str:
    """A plain-text report of a sweep directory (grouped mean ± std) or of one run directory (results.json, flat)."""
    kind, where = locate(path)
    return _sweep_report(where) if kind == "sweep" else _run_report(where)


def _run_report(results_json: Path) -> str:
    results = read_results(results_json)
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
    meta = sweep_meta(out)
    status = point_status(out)
    df = collect(out)
    params = param_columns(meta)
    varying = varying_params(df, params)
    done = sum(s == "done" for s in status.values())
    lines = [f"sweep {out}: {meta['notebook_name']}, {len(status)} points, {done} done "
             f"(grid {meta['grid_hash']})"]
    for st in ("failed", "pending"):
        names = [n for n, s in status.items() if s == st]
        if names:
            lines.append(f"{st}: {', '.join(names)}")
    if df.empty:
        return "\n".join([*lines, "", "(no finished points yet)"])

    metrics = result_columns(df, params)
    groups = [k for k in varying if not is_seed(k)]
    seeds = [k for k in varying if is_seed(k)]
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
