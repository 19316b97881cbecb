"""Flower run config <-> legokit ``ExperimentConfig``, and the Flower app project that carries it.

Flower's run config is flat and holds only ``bool | int | float | str``; legokit's config is nested
dataclasses. The keys mirror the experiment config one to one (``seed``, ``lora.rank``,
``fed.num_clients``, ...). Values that are lists or may be null (``prune.sparsities``, ``data.tasks``,
``fed.global_rank``) travel as JSON strings (``"[0.0, 0.5]"``, ``"null"``). A few keys that only the
Flower app needs (``run-dir``, ``round-timeout``, ...) have hyphenated names so they never clash with
a legokit key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from legokit import __version__
from legokit.config import SECTIONS, ExperimentConfig, sampled_count
from legokit.names import aggregator_pools_clients
from legokit.utils import LegokitError, atomic_write_text

RunConfig = dict[str, bool | int | float | str]

#: Flower-only run config keys and their defaults.
FLOWER_DEFAULTS: RunConfig = {
    "run-dir": "",  # where the ServerApp writes the run directory; "" = ./runs/flower-<Flower run id>
    "resume": False,  # continue the run directory from its last finished round
    "round-timeout": 3600.0,  # seconds a round waits for replies, then aggregates what arrived
    "nodes-timeout": 300.0,  # seconds the ServerApp waits at start for a SuperNode per client
    "poll-interval": 0.2,  # seconds between two pulls of replies from the SuperLink
    "blocks-dir": "",  # where ClientApps read blocks unless their node config says; "" = <run-dir>/blocks
    # Flower's SecAgg+ (legokit.flower.secagg): the server sees only the sum of the clients' masked updates
    "secagg": False,  # aggregate every round with SecAggPlusWorkflow / secaggplus_mod
    "secagg-threshold": 2,  # shares needed to rebuild a dropped client's mask; a round needs this many clients
    "secagg-clip": 1.0,  # SecAgg+ clipping range c (a power of 2, >= 1): |M_k ⊙ ΔW_k| must stay below it
    "secagg-save-sums": False,  # also write each round's securely aggregated ΔW_g to <run-dir>/secagg/
}

#: Node config keys a SuperNode may set (``--node-config "partition-id=0 ..."``).
NODE_KEYS = {
    "partition-id": "which client this SuperNode is: its data partition, 0 .. fed.num_clients - 1 (required)",
    "num-partitions": "optional; checked against fed.num_clients",
    "blocks-dir": "directory holding the saved blocks (index.json, 0/, 1/, ...); default: run config blocks-dir",
    "block-id": "optional: the block this device holds (e.g. wanda-unstructured-50); default: the server's choice",
    "device": "optional torch device for training (default: the experiment's device)",
    "threads": "optional torch CPU threads for training (default: torch's choice)",
}


@dataclass(frozen=True)
class FlowerOptions:
    """The Flower-only settings of a run (see ``FLOWER_DEFAULTS``)."""

    run_dir: str = ""
    resume: bool = False
    round_timeout: float = 3600.0
    nodes_timeout: float = 300.0
    poll_interval: float = 0.2
    blocks_dir: str = ""
    secagg: bool = False
    secagg_threshold: int = 2
    secagg_clip: float = 1.0
    secagg_save_sums: bool = False

    def __post_init__(self):
        if self.round_timeout <= 0:
            raise LegokitError(f"round-timeout={self.round_timeout} must be > 0 seconds")
        if self.nodes_timeout < 0:
            raise LegokitError(f"nodes-timeout={self.nodes_timeout} must be >= 0 seconds")
        if not 0 < self.poll_interval <= 10:
            raise LegokitError(f"poll-interval={self.poll_interval} must be in (0, 10] seconds")
        if self.secagg_threshold < 2:
            raise LegokitError(f"secagg-threshold={self.secagg_threshold}: SecAgg+ needs at least 2 shares to "
                               "rebuild a mask (one share would let any single client unmask another)")
        c = self.secagg_clip
        if not (c >= 1 and math.log2(c).is_integer()):
            raise LegokitError(f"secagg-clip={c} must be a power of 2 >= 1 (1, 2, 4, ...): the counts n_k M_k / W "
                               "reach 1 and must be quantized exactly (see legokit.flower.secagg)")


def _json_encoded(annotation: Any) -> bool:
    """Fields whose value is a list or may be None travel as JSON strings."""
    ann = str(annotation)
    return "list" in ann or "None" in ann


def _leaves() -> dict[str, tuple[str | None, str, bool]]:
    """Every config leaf: run config key -> (section or None, field name, JSON-encoded?)."""
    out: dict[str, tuple[str | None, str, bool]] = {}
    for f in fields(ExperimentConfig):
        if f.name in SECTIONS:
            for g in fields(SECTIONS[f.name]):
                out[f"{f.name}.{g.name}"] = (f.name, g.name, _json_encoded(g.type))
        else:
            out[f.name] = (None, f.name, _json_encoded(f.type))
    return out


def to_run_config(cfg: ExperimentConfig, **flower: Any) -> RunConfig:
    """The flat Flower run config of an experiment config plus Flower-only settings.

    Args:
        cfg: the experiment.
        flower: Flower-only keys with ``_`` for ``-`` (``run_dir="runs/x"``, ``round_timeout=60``).
    Returns:
        ``{key: bool | int | float | str}``, every config leaf and every Flower key present.
    """
    d = cfg.to_dict()
    out: RunConfig = {}
    for key, (section, name, encoded) in _leaves().items():
        value = d[section][name] if section else d[name]
        out[key] = json.dumps(value) if encoded else value
    out.update(FLOWER_DEFAULTS)
    for k, v in flower.items():
        key = k.replace("_", "-")
        if key not in FLOWER_DEFAULTS:
            raise LegokitError(f"unknown Flower setting {k!r}: use one of {sorted(FLOWER_DEFAULTS)}")
        out[key] = str(v) if isinstance(v, Path) else v
    return out


def from_run_config(run_config: Mapping[str, Any]) -> tuple[ExperimentConfig, FlowerOptions]:
    """Rebuild the experiment config and the Flower options from a (possibly partial) run config.

    Missing keys take the defaults of ``ExperimentConfig`` / ``FLOWER_DEFAULTS``; an unknown key is an
    error that names the closest valid one (via ``ExperimentConfig.with_overrides``).
    """
    leaves = _leaves()
    overrides: dict[str, Any] = {}
    opts = dict(FLOWER_DEFAULTS)
    for key, value in run_config.items():
        if key in FLOWER_DEFAULTS:
            opts[key] = value
            continue
        leaf = leaves.get(key)
        if leaf is not None and leaf[2] and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise LegokitError(f"run config {key}={value!r} is not JSON: write lists as '[0.0, 0.5]' "
                                   "and null as 'null'") from err
        overrides[key] = value
    cfg = ExperimentConfig().with_overrides(overrides)
    try:
        options = FlowerOptions(run_dir=str(opts["run-dir"]), resume=bool(opts["resume"]),
                                round_timeout=float(opts["round-timeout"]),
                                nodes_timeout=float(opts["nodes-timeout"]),
                                poll_interval=float(opts["poll-interval"]), blocks_dir=str(opts["blocks-dir"]),
                                secagg=bool(opts["secagg"]), secagg_threshold=int(opts["secagg-threshold"]),
                                secagg_clip=float(opts["secagg-clip"]),
                                secagg_save_sums=bool(opts["secagg-save-sums"]))
    except (TypeError, ValueError) as err:
        if isinstance(err, LegokitError):
            raise
        raise LegokitError(f"bad Flower setting in the run config: {err}") from err
    return cfg, options


#: Aggregators whose round SecAgg+ can carry: owner means, a ratio of two sums (``legokit.flower.secagg``).
SECAGG_AGGREGATORS = ("heteagg", "heterofl")


def check_supported(cfg: ExperimentConfig, options: FlowerOptions | None = None) -> None:
    """Reject the modes the Flower app does not run (before any process starts)."""
    if options is not None and options.secagg:
        if cfg.fed.aggregator not in SECAGG_AGGREGATORS:
            raise LegokitError(f"secagg=true sums the clients' masked updates and counts, which carries the owner "
                               f"means {list(SECAGG_AGGREGATORS)}, not fed.aggregator={cfg.fed.aggregator!r}")
        per_round = sampled_count(cfg.fed.sample_fraction, cfg.fed.num_clients)
        if per_round < options.secagg_threshold:
            raise LegokitError(f"SecAgg+ with secagg-threshold={options.secagg_threshold} needs at least "
                               f"{options.secagg_threshold} clients per round, but a round has {per_round} "
                               f"(fed.num_clients={cfg.fed.num_clients}, fed.sample_fraction="
                               f"{cfg.fed.sample_fraction}): add clients or lower secagg-threshold (>= 2)")
    if aggregator_pools_clients(cfg.fed.aggregator):
        raise LegokitError("fed.aggregator='centralized' pools every client's data in one place: it is a "
                           "reference for the in-process loop (`legokit run`), not a federated run")
    if cfg.fed.broadcast == "merge":
        raise LegokitError("fed.broadcast='merge' folds the dense ΔW_g into every block, so clients would keep "
                           "state between rounds and receive dense updates; the Flower app runs "
                           "fed.broadcast='adapter' (only adapter factors travel): set fed.broadcast=adapter")


APP_NAME = "legokit-lego"


def client_component(run_config: Mapping[str, Any]) -> str:
    """The ClientApp of a run: ``secagg_app`` (behind Flower's ``secaggplus_mod``) when the run uses SecAgg+.

    A device's ClientApp either always or never takes part in SecAgg+, so a server cannot ask a SecAgg+ client
    for its update in the clear.
    """
    return "legokit.flower.client_app:" + ("secagg_app" if bool(run_config.get("secagg")) else "app")


def app_pyproject(run_config: Mapping[str, Any]) -> str:
    """The ``pyproject.toml`` of a Flower app whose ServerApp / ClientApp are legokit's.

    The components live in the installed ``legokit`` package, so the app bundle (FAB) holds only this
    file; every machine that runs a SuperNode or the SuperLink needs legokit installed.
    """
    import tomli_w


    nested: dict[str, Any] = {}
    for key, value in run_config.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": APP_NAME, "version": __version__,
                    "description": "LEGO (arXiv 2410.18287) on Flower: legokit's ServerApp and ClientApp",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "legokit",
                                  "components": {"serverapp": "legokit.flower.server_app:app",
                                                 "clientapp": client_component(run_config)},
                                  "config": nested}}},
    }
    header = ("# A Flower app running legokit's LEGO rounds. Generated by `legokit flower app`; the run config\n"
              "# mirrors legokit's ExperimentConfig (lists and nulls as JSON strings). Override with\n"
              "# `flwr run <this dir> <connection> -c 'fed.rounds=3 lora.rank=4'`.\n")
    return header + tomli_w.dumps(doc)


def write_app(directory: str | Path, cfg: ExperimentConfig | None = None, **flower: Any) -> Path:
    """Write a Flower app directory (only ``pyproject.toml``) for ``cfg`` (default: the defaults)."""
    run_config = to_run_config(cfg or ExperimentConfig(), **flower)
    check_supported(cfg or ExperimentConfig(), from_run_config(run_config)[1])
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / "pyproject.toml", app_pyproject(run_config))
    return d
