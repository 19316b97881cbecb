"""LEGO on Flower: run config, messages, bad input, the simulation engine, and a real loopback deployment.

The ``flower`` tests start a real SuperLink and SuperNodes (separate processes, free ports on 127.0.0.1)
and check that the distributed run computes what the in-process ``legokit.federation`` loop computes.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_config

from legokit.config import ExperimentConfig
from legokit.utils import LegokitError

TOL = 1e-5  # max |difference| allowed between the Flower run's and the in-process run's global adapter
# Every Flower process computes on one thread, as the in-process reference does (two ClientApps share 2 cores),
# and the SuperExec looks for new ClientApp work every 0.2 s instead of 1 s.
FLOWER_ENV = {"OMP_NUM_THREADS": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}


def _cfg(**fed) -> ExperimentConfig:
    return tiny_config(name="flower-test", device="cpu", fed=fed, eval={"base": False, "blocks": False})


def _have_data() -> bool:
    try:
        from legokit.data import load_task

        return all(load_task(t, "train") for t in ("boolq", "asdiv"))
    except Exception:
        return False


# Tests that read the prepared task data also carry `slow` (or `flower`), so `make test-fast` never needs assets.
needs_data = pytest.mark.skipif(not _have_data(), reason="task data not prepared: run `legokit setup` first")


def _reference(cfg: ExperimentConfig, blocks_from: Path, out: Path, inject_failures=None,
               threads: int | None = None) -> dict:
    """The in-process run (``legokit.federation``) on the same blocks; returns its final ΔW per module.

    See ``_reference_run``.
    """
    fed = _reference_run(cfg, blocks_from, out, inject_failures, threads)
    factors, scaling = fed.strategy.broadcast.adapter_for(None)
    return {n: scaling * (b @ a) for n, (a, b) in factors.items()}


def _reference_run(cfg: ExperimentConfig, blocks_from: Path, out: Path, inject_failures=None,
                   threads: int | None = None):
    """The in-process run (``legokit.federation``) on the same blocks; returns the finished ``Federation``.

    ``threads``: torch threads for the run, to match the Flower processes' (``FLOWER_ENV``). Bit-equality
    needs the same float summation order: with a degenerate aggregate (one survivor, global rank 4 > its
    rank 2) the SVD's spare directions are rounding noise, and Adam turns any difference there into lr-sized
    steps in the next round.
    """
    from legokit.experiment import client_partitions, load_or_extract_blocks
    from legokit.federation import run_federation
    from legokit.models import load_model

    out.mkdir(parents=True)
    shutil.copytree(blocks_from / "blocks", out / "blocks")
    llm, tok = load_model(cfg.model, device=cfg.device)
    blocks = load_or_extract_blocks(cfg, llm, tok, out, progress=False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        fed = run_federation(cfg, llm, tok, blocks, client_partitions(cfg), out, progress=False,
                             inject_failures=inject_failures)
    finally:
        torch.set_num_threads(before)
    return fed


def _adapter_delta(run_dir: Path, rnd: int) -> dict:
    from legokit.adapters import load_peft_adapter

    factors, alpha = load_peft_adapter(run_dir / "adapters" / f"round_{rnd:03d}")
    rank = next(iter(factors.values()))[0].shape[0]
    return {n: (alpha / rank) * (b @ a) for n, (a, b) in factors.items()}


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _lines(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines() if x.strip()]


# ----- run config and messages (no processes) ------------------------------------------------------------
def test_run_config_mirrors_the_experiment_config():
    from legokit.flower.runconfig import from_run_config, to_run_config

    cfg = _cfg(global_rank=3).with_overrides({"data.alpha": 0.5, "lora.target_modules": ["q_proj", "v_proj"]})
    rc = to_run_config(cfg, run_dir="/tmp/somewhere", round_timeout=12)
    assert rc["fed.num_clients"] == 2 and rc["lora.rank"] == 2 and rc["model"] == "tiny-llama"
    assert rc["prune.sparsities"] == "[0.0, 0.5]" and rc["fed.client_sparsities"] == "null"
    assert all(isinstance(v, (bool, int, float, str)) for v in rc.values())
    back, opts = from_run_config(rc)
    assert back.to_dict() == cfg.to_dict()
    assert opts.run_dir == "/tmp/somewhere" and opts.round_timeout == 12
    assert from_run_config({})[0].to_dict() == ExperimentConfig().to_dict()
    with pytest.raises(LegokitError, match="'fed.round': did you mean 'rounds'"):
        from_run_config({"fed.round": 3})
    with pytest.raises(LegokitError, match="not JSON"):
        from_run_config({"prune.sparsities": "[0.0, 0.5"})
    with pytest.raises(LegokitError, match="merge"):
        from legokit.flower.runconfig import check_supported

        check_supported(_cfg(broadcast="merge"))


def test_generated_app_is_a_valid_flower_app(tmp_path):
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import flatten_dict

    from legokit.flower.runconfig import to_run_config, write_app

    write_app(tmp_path, _cfg(), run_dir=tmp_path / "run")
    config, warnings = load_and_validate(tmp_path / "pyproject.toml")
    assert config is not None, warnings
    assert config["tool"]["flwr"]["app"]["components"]["serverapp"] == "legokit.flower.server_app:app"
    assert flatten_dict(config["tool"]["flwr"]["app"]["config"]) == to_run_config(_cfg(), run_dir=tmp_path / "run")


def test_factors_travel_exactly_and_malformed_records_are_refused():
    from flwr.app import ArrayRecord

    from legokit.flower.messages import factors_from_record, factors_to_record, record_nbytes

    gen = torch.Generator().manual_seed(0)
    factors = {"model.layers.0.self_attn.q_proj": (torch.randn(2, 6, generator=gen), torch.randn(4, 2, generator=gen))}
    rec = factors_to_record(factors)
    assert list(rec.keys()) == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    back = factors_from_record(rec, "client 0")
    for n, (a, b) in factors.items():
        assert torch.equal(back[n][0], a) and torch.equal(back[n][1], b)
    # the wire size grows with the data byte for byte (fixed per-array headers aside)
    bigger = factors_to_record({n: (torch.zeros(3, 6), torch.zeros(4, 3)) for n in factors})
    assert record_nbytes(rec) >= (2 * 6 + 4 * 2) * 4
    assert record_nbytes(bigger) - record_nbytes(rec) == (6 + 4) * 4  # one more rank: a row of A, a column of B
    with pytest.raises(LegokitError, match="client 3: .*lora_A without lora_B"):
        factors_from_record(ArrayRecord({"base_model.model.x.lora_A.weight": torch.zeros(2, 3)}), "client 3")
    with pytest.raises(LegokitError, match="client 3 sent .* as float64"):
        factors_from_record(ArrayRecord({"base_model.model.x.lora_A.weight": torch.zeros(2, 3, dtype=torch.float64)}),
                            "client 3")


class _Reply:
    """Duck-typed stand-in for a Flower reply (real ones need a running Flower runtime)."""

    def __init__(self, info: dict | None = None, error: str | None = None):
        from flwr.app import ConfigRecord

        self.content = {"info": ConfigRecord(info or {})}
        self.error = SimpleNamespace(code=2, reason=f"<class 'legokit.utils.LegokitError'>:<'{error}'>")
        self._failed = error is not None

    def has_error(self) -> bool:
        return self._failed


def test_server_admits_supernodes_by_partition_and_block(tmp_path):
    from legokit.checkpoint import Checkpoint
    from legokit.flower.runconfig import FlowerOptions
    from legokit.flower.strategy import FlowerStrategy
    from legokit.strategy import LegoStrategy

    # discovery needs only the blocks' ids: no model, no global state
    blocks = [SimpleNamespace(id="wanda-unstructured-0"), SimpleNamespace(id="wanda-unstructured-50")]
    lego = LegoStrategy(_cfg(), blocks, [0, 1], {}, broadcast=None, aggregator="heteagg")
    strategy = FlowerStrategy(lego, Checkpoint(tmp_path, _cfg(), resume=False), FlowerOptions(), log=lambda line: None)
    nodes = strategy.supernodes  # the client runner: it maps SuperNodes to clients
    nodes._admit(11, _Reply({"partition-id": 0, "block-id": "", "num-examples": 4}))
    nodes._admit(12, _Reply({"partition-id": 0, "block-id": "", "num-examples": 4}))  # duplicate
    nodes._admit(13, _Reply({"partition-id": 2, "block-id": ""}))  # out of range
    nodes._admit(14, _Reply({"partition-id": 1, "block-id": "magnitude-unstructured-90"}))  # unknown block
    nodes._admit(15, _Reply(error="partition-id=9 is out of range"))  # the ClientApp refused itself
    nodes._admit(16, _Reply({"partition-id": 1, "block-id": "wanda-unstructured-0", "num-examples": 3}))
    assert nodes.clients == strategy.clients == {0: 11, 1: 16}
    assert lego.assignment == (0, 0)  # client 1's device declared the dense block: its masks are used
    assert nodes.nodes[11]["num_examples"] == 4 and nodes.nodes[16]["num_examples"] == 3
    reasons = {n: v.get("reason", "") for n, v in nodes.nodes.items()}
    assert "already served by SuperNode 11" in reasons[12]
    assert "partition-id 2 is out of range 0..1" in reasons[13]
    assert "'magnitude-unstructured-90', unknown to the server" in reasons[14]
    assert reasons[15] == "CLIENT_APP_RAISED_EXCEPTION: LegokitError: partition-id=9 is out of range"
    nodes._write_nodes()
    assert json.loads((tmp_path / "nodes.json").read_text())["16"]["status"] == "ok"


@pytest.mark.slow
@needs_data
def test_supernode_with_out_of_range_partition_is_refused(tmp_path):
    from legokit.flower.client_app import client_query
    from legokit.flower.runconfig import to_run_config

    rc = to_run_config(_cfg(), run_dir=tmp_path)
    from legokit.experiment import client_partitions

    info = client_query({"partition-id": 1}, rc)["info"]
    assert info["partition-id"] == 1 and info["num-examples"] == len(client_partitions(_cfg())[1])
    with pytest.raises(LegokitError, match=r"partition-id=5 is out of range.*fed.num_clients=2.*0\.\.1"):
        client_query({"partition-id": 5}, rc)
    with pytest.raises(LegokitError, match="no partition-id"):
        client_query({}, rc)
    with pytest.raises(LegokitError, match="num-partitions=3"):
        client_query({"partition-id": 0, "num-partitions": 3}, rc)


def test_unreachable_superlink_names_the_address(capsys):
    from legokit.flower.cli import main
    from legokit.flower.processes import check_superlink, free_port

    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    with pytest.raises(LegokitError, match=f"no SuperLink reachable at {address}"):
        check_superlink(address, timeout=1.0)
    assert main(["run", "--app", ".", "--superlink", address, "--insecure"]) == 2
    assert address in capsys.readouterr().err


# ----- Flower's simulation engine (one process) -----------------------------------------------------------
@pytest.mark.slow
@needs_data
def test_simulation_engine_equals_in_process_run(tmp_path, user_flwr_home):
    from legokit.flower.simulation import RAY_BACKEND_MODULE, simulate

    cfg = _cfg()
    out = simulate(cfg, tmp_path / "sim", backend="inline")
    assert out["backend"] == "inline" and RAY_BACKEND_MODULE not in sys.modules  # the plug-in backend is gone after
    assert out["summary"]["rounds"] == 2 and all(r["up"] > 0 for r in out["summary"]["bytes_per_round"])
    ref = _reference(cfg, tmp_path / "sim", tmp_path / "ref")
    assert _max_diff(_adapter_delta(tmp_path / "sim", 2), ref) <= TOL
    flower_lines, ref_lines = _lines(tmp_path / "sim"), _lines(tmp_path / "ref")
    assert [(m["round"], m["client"], m["status"]) for m in flower_lines] == \
        [(m["round"], m["client"], m["status"]) for m in ref_lines]
    assert [m["loss_last"] for m in flower_lines] == pytest.approx([m["loss_last"] for m in ref_lines], abs=1e-6)


@pytest.mark.slow
@needs_data
def test_bad_updates_are_rejected_recorded_and_not_aggregated(tmp_path, user_flwr_home):
    """Client 1 sends wrong shapes in round 1 and an unknown block id in round 2: both are refused."""
    from flwr.app import ArrayRecord, Context, Message
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from legokit.flower.client_app import client_query, client_train
    from legokit.flower.runconfig import to_run_config
    from legokit.flower.server_app import make_server_app
    from legokit.flower.simulation import private_flower_home, simulation_backend

    cfg = _cfg()
    rc = to_run_config(cfg, run_dir=tmp_path / "run", poll_interval=0.05)
    bad = ClientApp()

    @bad.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(client_query(context.node_config, rc), reply_to=msg)

    @bad.train()
    def train(msg: Message, context: Context) -> Message:
        reply = client_train(msg.content, context.node_config, rc)
        rnd, k = msg.content["config"]["round"], msg.content["config"]["client"]
        if k == 1 and rnd == 1:  # an adapter with wrong shapes
            state = reply["factors"].to_torch_state_dict()
            key = next(iter(state))
            state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
            reply["factors"] = ArrayRecord(state)
        if k == 1 and rnd == 2:  # a block id the server does not know
            reply["info"]["block-id"] = "magnitude-unstructured-90"
        return Message(reply, reply_to=msg)

    with private_flower_home(), simulation_backend("inline") as name:
        run_simulation(server_app=make_server_app(rc), client_app=bad, num_supernodes=2, backend_name=name)
    lines = {(m["round"], m["client"]): m for m in _lines(tmp_path / "run")}
    assert [lines[(r, 0)]["status"] for r in (1, 2)] == ["ok", "ok"]
    assert lines[(1, 1)]["status"] == "failed" and "have shapes A" in lines[(1, 1)]["error"]
    assert lines[(2, 1)]["status"] == "failed" and "'magnitude-unstructured-90', unknown to the server" in \
        lines[(2, 1)]["error"]
    assert [r["failed"] for r in _lines(tmp_path / "run", "rounds.jsonl")] == [[1], [1]]
    ref = _reference(cfg, tmp_path / "run", tmp_path / "ref", inject_failures={1: [1], 2: [1]})
    assert _max_diff(_adapter_delta(tmp_path / "run", 2), ref) <= TOL


# ----- the deployment engine: a real SuperLink and SuperNodes on 127.0.0.1 --------------------------------
def _all_pids(dep) -> list[int]:
    from legokit.flower.processes import descendants

    procs = [dep.superlink, *dep.supernodes]
    return [q for p in procs if p is not None for q in (p.pid, *descendants(p.pid))]


def _assert_gone(pids: list[int]) -> None:
    import psutil

    deadline = time.time() + 10
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left running: {alive}"


@pytest.fixture
def user_flwr_home():
    """Fail if a test writes to the user's ~/.flwr (every Flower process must use our FLWR_HOME)."""
    home = Path.home() / ".flwr"
    existed = home.exists()
    yield
    if not existed:
        assert not home.exists(), f"a Flower process wrote to {home}"


@pytest.mark.flower
def test_processes_are_stopped_when_the_launcher_fails(tmp_path, user_flwr_home):
    from legokit.flower.deployment import Deployment

    with pytest.raises(RuntimeError, match="boom"), Deployment(tmp_path) as dep:
        dep.start_superlink()
        pids = _all_pids(dep)
        assert len(pids) >= 2  # the SuperLink and the SuperExec it starts
        raise RuntimeError("boom")
    _assert_gone(pids)


def _run_two_supernodes(tmp_path: Path, app: Path, timeout: float) -> dict:
    """A SuperLink and SuperNodes for clients 0 and 1 on loopback run ``app``; every process is gone afterwards.
    Returns the run's status (``Deployment.wait_run``), which must be ``finished:completed``."""
    from legokit.flower.deployment import Deployment

    with Deployment(tmp_path / "flower", env=FLOWER_ENV) as dep:
        dep.start_superlink()
        for k in range(2):
            dep.start_supernode({"partition-id": k, "num-partitions": 2, "threads": 1})
        dep.wait_nodes()
        run_id, stream = dep.submit(app)
        status = dep.wait_run(run_id, stream, timeout=timeout)
        pids = _all_pids(dep)
    _assert_gone(pids)
    assert status["status"] == "finished:completed", (tmp_path / "flower" / "logs" / "flwr-run-0.log").read_text()
    return status


@needs_data
@pytest.mark.flower
def test_loopback_deployment_equals_in_process_run(tmp_path, user_flwr_home):
    from legokit.flower.runconfig import write_app

    cfg = _cfg()
    run_dir = tmp_path / "run"
    app = write_app(tmp_path / "app", cfg, run_dir=run_dir, round_timeout=120, nodes_timeout=60)
    t0 = time.time()
    status = _run_two_supernodes(tmp_path, app, timeout=240)
    lines = _lines(run_dir)
    assert [(m["round"], m["client"], m["status"]) for m in lines] == [(1, 0, "ok"), (1, 1, "ok"), (2, 0, "ok"),
                                                                         (2, 1, "ok")]
    nodes = json.loads((run_dir / "nodes.json").read_text())
    assert sorted(v["client"] for v in nodes.values() if v["status"] == "ok") == [0, 1]
    ref = _reference(cfg, run_dir, tmp_path / "ref", threads=1)
    diff = _max_diff(_adapter_delta(run_dir, 2), ref)
    print(f"\nloopback deployment: {time.time() - t0:.1f} s; max |ΔW_flower - ΔW_in-process| = {diff:.3g}; "
          f"bytes/round {[(r['bytes_down'], r['bytes_up']) for r in _lines(run_dir, 'rounds.jsonl')]}; "
          f"SuperLink traffic {status.get('network-traffic')}")
    assert diff <= TOL
    assert status["network-traffic"]["total-bytes"] > sum(r["bytes_up"] for r in _lines(run_dir, "rounds.jsonl"))


def _training_clientapp(proc) -> bool:
    """Is a ClientApp process (not a finished one) running under this SuperNode?"""
    import psutil

    from legokit.flower.processes import descendants

    for pid in descendants(proc.pid):
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE and any("flwr-clientapp" in c for c in p.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


@needs_data
@pytest.mark.flower
def test_supernode_killed_mid_round_run_finishes_over_survivors(tmp_path, user_flwr_home):
    from legokit.flower.deployment import Deployment
    from legokit.flower.processes import kill_process
    from legokit.flower.runconfig import write_app

    cfg = _cfg()
    run_dir = tmp_path / "run"
    # A SIGKILLed SuperNode stops heartbeating; the SuperLink would call it gone only after 2 x 30 s. The round
    # deadline ends the wait sooner; 40 s leaves a busy 2-core machine room for the survivor (about 10 s idle).
    app = write_app(tmp_path / "app", cfg, run_dir=run_dir, round_timeout=40, nodes_timeout=60)
    with Deployment(tmp_path / "flower", env=FLOWER_ENV) as dep:
        dep.start_superlink()
        dep.start_supernode({"partition-id": 0, "num-partitions": 2, "threads": 1})
        victim = dep.start_supernode({"partition-id": 1, "num-partitions": 2, "threads": 1})
        dep.start_supernode({"partition-id": 7})  # bad input: no such client
        dep.wait_nodes()
        run_id, stream = dep.submit(app)
        # Discovery done (both clients mapped), then the victim's round-1 ClientApp starts: crash it there.
        deadline = time.time() + 90
        while time.time() < deadline and not (run_dir / "nodes.json").is_file():
            time.sleep(0.1)
        while time.time() < deadline:
            nodes = json.loads((run_dir / "nodes.json").read_text())
            if sorted(v["client"] for v in nodes.values() if v["status"] == "ok") == [0, 1]:
                break
            time.sleep(0.1)
        while time.time() < deadline and not _training_clientapp(victim):
            time.sleep(0.05)
        assert time.time() < deadline, "the victim's round-1 ClientApp never started"
        kill_process(victim)
        status = dep.wait_run(run_id, stream, timeout=150)
        pids = _all_pids(dep)
    _assert_gone(pids)
    assert status["status"] == "finished:completed", (tmp_path / "flower" / "logs" / "flwr-run-0.log").read_text()
    nodes = json.loads((run_dir / "nodes.json").read_text())
    rejected = [v for v in nodes.values() if v["status"] == "rejected"]
    assert len(rejected) == 1 and "partition-id=7 is out of range" in rejected[0]["reason"]
    lines = {(m["round"], m["client"]): m for m in _lines(run_dir)}
    assert lines[(1, 0)]["status"] == "ok" and lines[(2, 0)]["status"] == "ok"
    assert lines[(1, 1)]["status"] == "failed" and lines[(2, 1)]["status"] == "failed"
    # Either the round deadline ends the wait, or the SuperLink already calls the node gone (missed heartbeats,
    # Flower 1.42's NODE_UNAVAILABLE): which comes first depends on timing; both record the client as failed.
    error = lines[(1, 1)]["error"]
    assert "no reply within round-timeout=40" in error or error.startswith("NODE_UNAVAILABLE"), error
    assert json.loads((run_dir / "state.json").read_text())["round"] == 2
    # The same failures in the in-process loop give the same global adapter.
    ref = _reference(cfg, run_dir, tmp_path / "ref", inject_failures={1: [1], 2: [1]}, threads=1)
    assert _max_diff(_adapter_delta(run_dir, 2), ref) <= TOL



# ----- Flower's SecAgg+ ------------------------------------------------------------------------------------
@needs_data
@pytest.mark.flower
@pytest.mark.slow
def test_secagg_deployment_equals_in_process_aggregate(tmp_path, user_flwr_home):
    """One HeteAgg round through Flower's SecAgg+ on a real loopback deployment: the server's ΔW_g (from the
    securely summed numerator and counts) equals the in-process aggregate within the quantization bound."""
    from safetensors.torch import load_file

    from legokit.aggregate import ClientUpdate
    from legokit.flower.runconfig import write_app
    from legokit.flower.secagg import Quantization

    cfg = _cfg(rounds=1)
    run_dir = tmp_path / "run"
    app = write_app(tmp_path / "app", cfg, run_dir=run_dir, round_timeout=240, nodes_timeout=60, secagg=True,
                    secagg_save_sums=True)
    t0 = time.time()
    _run_two_supernodes(tmp_path, app, timeout=500)
    lines = _lines(run_dir)
    assert [(m["client"], m["status"]) for m in lines] == [(0, "ok"), (1, "ok")]
    assert all("update_norm" not in m for m in lines)  # the server never holds a client's update
    secagg = _lines(run_dir, "rounds.jsonl")[0]["secagg"]
    assert secagg["clients"] == [0, 1] and secagg["threshold"] == 2
    got = load_file(str(run_dir / "secagg" / "round_001.safetensors"))

    fed = _reference_run(cfg, run_dir, tmp_path / "ref", threads=1)
    strategy, results = fed.strategy, fed.strategy.last_results
    weights = [r.num_examples for r in results]
    quant = Quantization.for_round(2, max(weights), 1.0)
    bound = quant.bound(min(weights))
    assert secagg["bound"] == pytest.approx(bound) and quant.max_weight >= max(weights)
    # The exact owner mean in float64 (the oracle), and the library's in-process aggregate (float32).
    exact, library = {}, {}
    for name in strategy.modules:
        ups = [ClientUpdate(f"c{r.client}", {name: r.factors[name]}, r.scaling,
                            {name: strategy.block_of(r.client).masks[name]}, float(r.num_examples)) for r in results]
        num = sum(u.weight * u.masked_delta(name).double() for u in ups)
        den = sum(u.weight * u.masks[name].double() for u in ups)
        exact[name] = num / den  # the dense client owns every weight: den > 0 everywhere
        library[name] = strategy.combine(results, name)
    peak = max(float(v.abs().max()) for v in exact.values())
    diff = _max_diff({n: v.double() for n, v in got.items()}, exact)
    diff_library = _max_diff(got, library)
    print(f"\nSecAgg+ loopback deployment: {time.time() - t0:.1f} s; max |ΔW_g SecAgg+ - ΔW_g exact| = {diff:.3g}, "
          f"vs in-process HeteAgg (float32) {diff_library:.3g}; bound {bound:.3g} (Q={quant.quantization_range}, "
          f"c={quant.clip:g}, W={quant.max_weight}, n={weights}); max |ΔW_g| {peak:.3g}")
    assert 0 < diff <= bound + 2 ** -22 * peak  # quantized (not sent in the clear), within the bound (+ float32)
    assert diff_library <= bound + 1e-6 * peak


def test_secagg_settings_are_checked_before_any_process(tmp_path):
    from legokit.flower.runconfig import FlowerOptions, check_supported, from_run_config, write_app

    with pytest.raises(LegokitError, match=r"secagg-threshold=3 needs at least 3 clients per round, but a round "
                                           r"has 2 \(fed.num_clients=2"):
        check_supported(_cfg(), FlowerOptions(secagg=True, secagg_threshold=3))
    with pytest.raises(LegokitError, match=r"owner means \['heteagg', 'heterofl'\], not fed.aggregator='flexlora'"):
        check_supported(_cfg(aggregator="flexlora"), FlowerOptions(secagg=True))
    check_supported(_cfg(aggregator="flexlora"), FlowerOptions(secagg_threshold=3))  # SecAgg+ off: nothing to check
    with pytest.raises(LegokitError, match="secagg-threshold=1"):
        from_run_config({"secagg-threshold": 1})
    with pytest.raises(LegokitError, match="secagg-clip=3.0 must be a power of 2"):
        from_run_config({"secagg-clip": 3.0})
    with pytest.raises(LegokitError, match="secagg-threshold=3"):
        write_app(tmp_path / "bad", _cfg(), secagg=True, secagg_threshold=3)
    assert not (tmp_path / "bad").exists()
    text = (write_app(tmp_path / "app", _cfg(), secagg=True) / "pyproject.toml").read_text()
    assert 'clientapp = "legokit.flower.client_app:secagg_app"' in text


def test_secagg_quantization_keeps_counts_exact_and_values_within_the_bound():
    """Flower's own quantize / dequantize with legokit's choice of (c, Q, W), the masks left out (they cancel
    modulo M): the counts come back exact and HeteAgg within ``Quantization.bound``."""
    import numpy as np
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from legokit.flower.secagg import Quantization, client_vectors

    gen = torch.Generator().manual_seed(0)
    weights, modules = [3, 8, 5], ["m"]
    quant = Quantization.for_round(len(weights), max(weights), 1.0)
    assert (quant.max_weight, quant.quantization_range) == (8, 2 ** 30)
    masks = [torch.rand(16, 24, generator=gen) < p for p in (1.01, 0.5, 0.25)]  # the first client owns all
    vectors, total, ratio = [], None, 0
    for k, w in enumerate(weights):
        factors = {"m": (torch.randn(2, 24, generator=gen) * 0.1, torch.randn(16, 2, generator=gen) * 0.1)}
        x = client_vectors(factors, 2.0, {"m": masks[k]}, modules, w, {"clip": 1.0, "max-weight": quant.max_weight},
                           f"client {k}")
        vectors.append(x)
        q_ratio = round(w / quant.max_weight * quant.quantization_range)  # what secaggplus_mod computes
        q = quantize([a * (q_ratio / quant.quantization_range) for a in x], quant.clip, quant.quantization_range)
        total = [a.astype(np.int64) for a in q] if total is None else [t + a for t, a in zip(total, q, strict=True)]
        ratio += q_ratio
    total = [t % quant.modulus_range for t in total]
    mean = [a + -(len(weights) - 1) * quant.clip for a in dequantize(total, quant.clip, quant.quantization_range)]
    num, den = (a * (quant.quantization_range / ratio) for a in mean)
    w = np.array(weights, dtype=np.float64)[:, None, None]
    exact_den = (w * np.stack([v[1] for v in vectors])).sum(0) / w.sum()
    exact = (w * np.stack([v[0] for v in vectors])).sum(0) / (w * np.stack([v[1] for v in vectors])).sum(0)
    assert np.allclose(den, exact_den, rtol=1e-15, atol=0)
    err = float(np.abs(num / den - exact).max())
    assert 0 < err <= quant.bound(min(weights))
    with pytest.raises(LegokitError, match=r"client 9: .* > secagg-clip=1.0: SecAgg\+ would clip it; set "
                                           r"secagg-clip=\d+"):
        client_vectors({"m": (torch.full((2, 24), 10.0), torch.full((16, 2), 10.0))}, 2.0, {"m": masks[0]}, modules,
                       8, {"clip": 1.0, "max-weight": 8}, "client 9")
