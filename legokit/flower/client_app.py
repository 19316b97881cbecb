"""The Flower ClientApp: one LEGO client on one SuperNode.

Component reference for a Flower app: ``legokit.flower.client_app:app``. The SuperNode's node config says
which client it is (``partition-id``), and optionally where its blocks are (``blocks-dir``), which block
the device holds (``block-id``), the torch ``device`` and CPU ``threads``. Each ``train`` message: load the
LLM and the block named by the server, take this client's data partition (``experiment.client_partitions``,
the same split the in-process loop uses), run ``client.local_update`` from the broadcast factors, and
send back the trained factors. Nothing is kept between rounds: the server sends each round's start state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from legokit import __version__
from legokit.blocks import Block
from legokit.client import examples_per_task, local_update
from legokit.experiment import client_partitions
from legokit.flower.messages import factors_from_record, factors_to_record
from legokit.flower.runconfig import client_component, from_run_config
from legokit.flower.secagg import client_vectors, client_weight, fit_reply, fit_task
from legokit.models import load_model
from legokit.utils import LegokitError

# One process may serve many messages (the simulation engine): keep the LLM and the partitions.
_CACHE: dict[tuple, Any] = {}


def partition_id(node_config: Mapping[str, Any], num_clients: int) -> int:
    """This SuperNode's client index, checked against ``fed.num_clients``."""
    if "partition-id" not in node_config:
        raise LegokitError("this SuperNode has no partition-id: start it with "
                           f"--node-config 'partition-id=K' (K in 0..{num_clients - 1})")
    k = node_config["partition-id"]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_clients:
        raise LegokitError(f"partition-id={k!r} is out of range: the experiment has fed.num_clients={num_clients} "
                           f"clients, so use 0..{num_clients - 1} in --node-config")
    parts = node_config.get("num-partitions")
    if parts is not None and parts != num_clients:
        raise LegokitError(f"num-partitions={parts} in the node config but the experiment has "
                           f"fed.num_clients={num_clients}: make them agree")
    return k


def blocks_dir(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Path:
    """Where this node reads the saved blocks: node config, else run config ``blocks-dir``, else run-dir."""
    d = str(node_config.get("blocks-dir", "") or run_config.get("blocks-dir", ""))
    if not d:
        run_dir = str(run_config.get("run-dir", ""))
        if not run_dir:
            raise LegokitError("no blocks directory: set blocks-dir in the node config (or run-dir in the run config)")
        d = str(Path(run_dir) / "blocks")
    return Path(d)


def _block_index(directory: Path, block_id: str) -> int:
    index = directory / "index.json"
    if not index.is_file():
        raise LegokitError(f"no blocks at {directory} (no index.json): copy the server's <run-dir>/blocks there "
                           "or set blocks-dir in the node config")
    ids = json.loads(index.read_text())["blocks"]
    if block_id not in ids:
        raise LegokitError(f"block {block_id!r} is not among this node's blocks {ids} in {directory}")
    return ids.index(block_id)


def _partition(cfg, k: int) -> list:
    key = ("partitions", cfg.to_yaml())
    if key not in _CACHE:
        _CACHE[key] = client_partitions(cfg)
    return _CACHE[key][k]


def _model(cfg, device: str):
    key = ("model", cfg.model, device, cfg.dtype)
    if key not in _CACHE:
        _CACHE[key] = load_model(cfg.model, device=device, dtype=cfg.dtype)
    return _CACHE[key]


def _process_age() -> float:
    """Seconds since this process started: under Flower's deployment engine each ClientApp call is a new
    process, so this is start-up (imports, model) plus the round's work."""
    try:
        import psutil  # optional dependency: without it the age is reported as -1

        return round(time.time() - psutil.Process().create_time(), 3)
    except Exception:  # psutil missing: report nothing rather than fail the round
        return -1.0


def client_query(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> RecordDict:
    """Answer the server's ``query``: which client this node is, its block (if declared), its data size."""
    cfg, _ = from_run_config(run_config)
    k = partition_id(node_config, cfg.fed.num_clients)
    examples = _partition(cfg, k)
    declared = str(node_config.get("block-id", ""))
    if declared:
        _block_index(blocks_dir(node_config, run_config), declared)
    return RecordDict({"info": ConfigRecord({"partition-id": k, "block-id": declared, "num-examples": len(examples),
                                             "tasks": json.dumps(examples_per_task(examples)),
                                             "legokit": __version__})})


def _local_round(conf, init, node_config: Mapping[str, Any], run_config: Mapping[str, Any]):
    """Train one round from ``init`` as the message's ``conf`` says; returns (client, block, examples, result)."""
    cfg, _ = from_run_config(run_config)
    k = partition_id(node_config, cfg.fed.num_clients)
    if conf.get("client") != k:
        raise LegokitError(f"this SuperNode serves client {k} but the message is for client {conf.get('client')!r}")
    block_id, rnd, scaling = str(conf["block-id"]), int(conf["round"]), float(conf["scaling"])
    declared = str(node_config.get("block-id", ""))
    if declared and declared != block_id:
        raise LegokitError(f"the server asks for block {block_id!r} but this device holds {declared!r}")
    if "threads" in node_config:
        torch.set_num_threads(int(node_config["threads"]))
    device = str(node_config.get("device", cfg.device))
    llm, tok = _model(cfg, device)
    bdir = blocks_dir(node_config, run_config)
    block = Block.load(bdir / str(_block_index(bdir, block_id)), llm)
    examples = _partition(cfg, k)
    res = local_update(cfg, block, tok, examples, factors_from_record(init, "the server"), scaling, client=k,
                       rnd=rnd, device=next(llm.parameters()).device, progress=False)
    return k, block, examples, res


def _reply_fields(k: int, block, examples: list, res) -> tuple[dict, dict]:
    """(metrics, info) of a trained round, as the server's ``client_metrics`` reads them."""
    m = res.metrics
    metrics = {"num-examples": res.num_examples, "loss-first": float(m["loss_first"]),
               "process-seconds": _process_age(), "loss-last": float(m["loss_last"]), "steps": int(m["steps"]),
               "tokens": int(m["tokens"]), "seconds": float(m["seconds"]),
               "tokens-per-second": float(m["tokens_per_second"])}
    info = {"client": k, "block-id": block.id, "scaling": float(res.scaling),
            "losses": [float(x) for x in m["losses"]], "tasks": json.dumps(examples_per_task(examples))}
    return metrics, info


def client_train(content: RecordDict, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> RecordDict:
    """One round of one client: the broadcast factors in, the trained factors out (LLM coordinates)."""
    k, block, examples, res = _local_round(content["config"], content["init"], node_config, run_config)
    metrics, info = _reply_fields(k, block, examples, res)
    return RecordDict({"factors": factors_to_record(res.factors), "metrics": MetricRecord(metrics),
                       "info": ConfigRecord(info)})


def client_train_secagg(content: RecordDict, node_config: Mapping[str, Any],
                        run_config: Mapping[str, Any]) -> RecordDict:
    """One SecAgg+ round of one client: train, then hand ``M_k ⊙ ΔW_k`` and ``M_k`` to ``secaggplus_mod``, which
    quantizes and masks them (``legokit.flower.secagg``); the trained factors never leave the device."""
    init, conf = fit_task(content)
    k, block, examples, res = _local_round(conf, init, node_config, run_config)
    weight = client_weight(bool(conf["weighted"]), res.num_examples)
    vectors = client_vectors(res.factors, res.scaling, block.masks, json.loads(str(conf["modules"])), weight, conf,
                             f"client {k}")
    metrics, info = _reply_fields(k, block, examples, res)
    return fit_reply(vectors, weight, {**metrics, **info, "losses": json.dumps(info["losses"])})


def make_client_app(defaults: Mapping[str, Any] | None = None, secagg: bool | None = None) -> ClientApp:
    """A ClientApp whose run config is ``defaults`` overridden by Flower's run config (see ``make_server_app``).

    ``secagg``: answer ``train`` through Flower's ``secaggplus_mod`` (default: the ``secagg`` of ``defaults``).
    Such a ClientApp only takes part in SecAgg+ runs, and a plain one refuses them.
    """
    bound = dict(defaults or {})
    secure = bool(bound.get("secagg")) if secagg is None else secagg
    client_app = ClientApp(mods=[secaggplus_mod] if secure else None)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(client_query(context.node_config, {**bound, **dict(context.run_config)}), reply_to=msg)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        run_config = {**bound, **dict(context.run_config)}
        if bool(run_config.get("secagg")) != secure:
            raise LegokitError(f"this ClientApp runs with secagg={secure} but the run asks for "
                               f"secagg={bool(run_config.get('secagg'))}: use the app's clientapp "
                               f"{client_component(run_config)}")
        work = client_train_secagg if secure else client_train
        return Message(work(msg.content, context.node_config, run_config), reply_to=msg)

    return client_app


app = make_client_app(secagg=False)
secagg_app = make_client_app(secagg=True)  # behind Flower's secaggplus_mod (run config secagg=true)
