"""Flower's deployment engine on this machine: a SuperLink and SuperNodes on loopback, as separate processes.

``Deployment`` starts a SuperLink and one SuperNode per client as separate processes, each in its own
process group, waits until they are healthy, submits the app with ``flwr run`` and always stops every
process it started (SuperLink, SuperNodes, and the SuperExec / ServerApp / ClientApp processes they spawn),
by process id and process group, also when something fails. Flower's state (``config.toml``, installed
app bundles) goes to ``FLWR_HOME`` in a temporary directory, never to ``~/.flwr``. ``deploy`` is the one
call: up, run the experiment, down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from legokit.config import ExperimentConfig
from legokit.flower.processes import (
    CONNECTION,
    Proc,
    check_superlink,
    flower_env,
    flower_executable,
    free_port,
    node_config_arg,
    start_process,
    stop_process,
    toml_value,
    wait_superlink,
    write_connection,
)
from legokit.flower.runconfig import check_supported, from_run_config, to_run_config, write_app
from legokit.utils import LegokitError


class Deployment:
    """A SuperLink and SuperNodes on this machine, as separate processes; a context manager that stops them.

    Args:
        work_dir: logs go to ``work_dir/logs``; FLWR_HOME is ``work_dir/flwr-home``.
        host: the loopback address to serve on.
        env: extra environment for every process (e.g. ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``).
    """

    def __init__(self, work_dir: str | Path, host: str = "127.0.0.1", env: Mapping[str, str] | None = None):
        self.work_dir = Path(work_dir).resolve()
        self.logs = self.work_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.work_dir / "flwr-home"
        self.host = host
        self.env = flower_env(self.flwr_home, env)
        self.superlink: Proc | None = None
        self.supernodes: list[Proc] = []
        self._runs: list[Proc] = []

    @property
    def address(self) -> str:
        if self.superlink is None:
            raise LegokitError("the SuperLink is not started")
        return f"{self.host}:{self.superlink.port}"

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def _spawn(self, name: str, cmd: list[str], port: int, node_config: dict | None = None) -> Proc:
        return start_process(name, cmd, log=self.logs / f"{name}.log", env=self.env, cwd=self.work_dir, port=port,
                             node_config=node_config)

    def start_superlink(self, timeout: float = 60.0) -> Proc:
        """Start ``flower-superlink --insecure`` on a free port and wait for its /health."""
        port = free_port(self.host)
        cmd = [flower_executable("flower-superlink"), "--insecure", "--host", self.host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
        self.superlink = self._spawn("superlink", cmd, port)
        write_connection(self.flwr_home, self.address)
        wait_superlink(self.superlink, self.address, timeout)
        return self.superlink

    def start_supernode(self, node_config: Mapping[str, Any], name: str | None = None) -> Proc:
        """Start ``flower-supernode --insecure`` connected to our SuperLink (not waited for: see ``wait_nodes``)."""
        port = free_port(self.host)
        name = name or f"supernode-{len(self.supernodes)}"
        cmd = [flower_executable("flower-supernode"), "--insecure", "--superlink", self.address, "--host", self.host,
               "--port", str(port), "--node-config", node_config_arg(node_config)]
        proc = self._spawn(name, cmd, port, dict(node_config))
        self.supernodes.append(proc)
        return proc

    def wait_nodes(self, procs: list[Proc] | None = None, timeout: float = 60.0) -> None:
        """Wait until each SuperNode registered with the SuperLink (its log shows its node id)."""
        deadline = time.time() + timeout
        pending = list(procs if procs is not None else self.supernodes)
        while pending:
            for p in list(pending):
                if not p.alive():
                    raise LegokitError(f"{p.name} exited (code {p.popen.returncode}):\n{p.log_tail()}")
                if "SuperNode ID:" in p.log.read_text(errors="replace"):
                    pending.remove(p)
            if pending and time.time() > deadline:
                raise LegokitError(f"{[p.name for p in pending]} did not connect within {timeout} s:\n"
                                   + "\n".join(p.log_tail(5) for p in pending))
            time.sleep(0.2)

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against our SuperLink (FLWR_HOME points at our config.toml)."""
        return subprocess.run([flower_executable("flwr"), *args], env=self.env, cwd=self.work_dir,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def submit(self, app_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> tuple[int, Proc]:
        """``flwr run APP legokit --stream`` in the background; returns (Flower run id, the streaming process)."""
        check_superlink(self.address)
        cmd = [flower_executable("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
        if overrides:
            cmd += ["--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())]
        proc = self._spawn(f"flwr-run-{len(self._runs)}", cmd, 0)
        self._runs.append(proc)
        deadline = time.time() + 60
        while True:
            m = re.search(r"Successfully started run (\d+)", proc.log.read_text(errors="replace"))
            if m:
                return int(m.group(1)), proc
            if not proc.alive() or time.time() > deadline:
                raise LegokitError(f"`flwr run` did not start a run:\n{proc.log_tail()}")
            time.sleep(0.2)

    def run_status(self, run_id: int) -> dict:
        """The SuperLink's record of a run (status, elapsed, network traffic) from ``flwr ls --format json``."""
        out = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(out.stdout)["runs"]
        except (json.JSONDecodeError, KeyError) as err:
            raise LegokitError(f"`flwr ls` gave no run status: {out.stdout[-500:]} {out.stderr[-500:]}") from err
        return runs[0] if runs else {}

    def wait_run(self, run_id: int, stream: Proc, timeout: float) -> dict:
        """Wait for a run to finish; return its status record. A run past ``timeout`` is stopped and raises."""
        deadline = time.time() + timeout
        while stream.alive() and time.time() < deadline:
            time.sleep(0.3)
        status = self.run_status(run_id)
        while not str(status.get("status", "")).startswith("finished") and time.time() < deadline:
            time.sleep(1.0)
            status = self.run_status(run_id)
        if not str(status.get("status", "")).startswith("finished"):
            self.flwr("stop", str(run_id), CONNECTION)
            raise LegokitError(f"Flower run {run_id} did not finish within {timeout} s "
                               f"(status {status.get('status')}); logs in {self.logs}")
        return status

    def stop(self) -> None:
        """Stop everything we started: runs' CLI, SuperNodes, then the SuperLink (each with its children)."""
        for proc in [*self._runs, *reversed(self.supernodes), *([self.superlink] if self.superlink else [])]:
            stop_process(proc)


# ----- one call: up, run, down ---------------------------------------------------------------------------
def deploy(cfg: ExperimentConfig, run_dir: str | Path, *, clients: int | None = None,
           work_dir: str | Path | None = None, timeout: float = 3600.0, round_timeout: float = 3600.0,
           resume: bool = False, task_poll_interval: float | None = 0.2, threads: int | None = None,
           env: Mapping[str, str] | None = None, extra_nodes: list[dict] | None = None,
           options: Mapping[str, Any] | None = None) -> dict:
    """Start a SuperLink and one SuperNode per client on loopback, run the experiment, stop them all.

    Args:
        cfg: the experiment (``fed.num_clients`` SuperNodes are started, ``partition-id`` 0..N-1).
        run_dir: the ServerApp's run directory (as ``legokit run --out``).
        clients: override ``fed.num_clients``.
        work_dir: logs and FLWR_HOME (default: a temporary directory, removed afterwards; logs are copied
            to ``run_dir/flower-logs``).
        timeout: seconds for the whole run; round_timeout: seconds a round waits for its clients' replies
            (the app's ``round-timeout``: ``legokit.flower.strategy.FlowerStrategy`` then records the missing
            clients as failed and aggregates over those that answered).
        task_poll_interval: ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (Flower's default is 1 s).
        threads: torch CPU threads of each ClientApp (node config ``threads``); default: the CPU cores divided
            by the clients, since all ClientApps of a round train at once on this machine (oversubscribed
            OpenMP threads make small matmuls many times slower).
        env: extra environment for every Flower process (e.g. ``OMP_NUM_THREADS`` for the ServerApp too).
        extra_nodes: node configs of additional SuperNodes (tests: a SuperNode with a bad partition id).
        options: more Flower settings of the app (``runconfig.FLOWER_DEFAULTS`` with ``_`` for ``-``), e.g.
            ``{"secagg": True, "secagg_threshold": 2}``.
    Returns:
        ``{"run_id", "status", "flower": <flwr ls record>, "summary": <run_dir/flower.json>, "seconds"}``.
    """

    if clients is not None and clients != cfg.fed.num_clients:
        cfg = cfg.with_overrides({"fed.num_clients": clients})
    options = dict(options or {})
    check_supported(cfg, from_run_config(to_run_config(cfg, **options))[1])  # before any process starts
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = None if work_dir is not None else tempfile.mkdtemp(prefix="legokit-flower-")
    wdir = Path(work_dir or tmp)
    env = {**({"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(task_poll_interval)} if task_poll_interval else {}),
           **(env or {})}
    (run_dir / "flower.json").unlink(missing_ok=True)  # a summary left by an earlier run would mislead
    t0 = time.time()
    try:
        app_dir = write_app(wdir / "app", cfg, run_dir=run_dir, round_timeout=round_timeout, resume=resume,
                            nodes_timeout=120.0, **options)
        with Deployment(wdir, env=env) as dep:
            dep.start_superlink()
            n = cfg.fed.num_clients
            threads = threads or max(1, (os.cpu_count() or 1) // n)
            for k in range(n):
                nc = {"partition-id": k, "num-partitions": n, "threads": threads}
                dep.start_supernode(nc, name=f"supernode-{k}")
            for j, nc in enumerate(extra_nodes or []):
                dep.start_supernode(nc, name=f"supernode-extra-{j}")
            dep.wait_nodes()
            run_id, stream = dep.submit(app_dir)
            status = dep.wait_run(run_id, stream, timeout)
        summary_file = run_dir / "flower.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if status.get("status") != "finished:completed":
            raise LegokitError(f"Flower run {run_id} ended {status.get('status')}: {status.get('status-details', '')}"
                               f"\nServerApp log: {dep.logs / 'flwr-run-0.log'}")
        return {"run_id": run_id, "status": status.get("status"), "flower": status, "summary": summary,
                "seconds": round(time.time() - t0, 3)}
    finally:
        if tmp is not None:
            shutil.copytree(wdir / "logs", run_dir / "flower-logs", dirs_exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
