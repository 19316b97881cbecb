"""Run LEGO on Flower: the deployment engine on loopback (processes), or the simulation engine (one process).

``Deployment`` starts a SuperLink and one SuperNode per client as separate processes, each in its own
process group, waits until they are healthy, submits the app with ``flwr run`` and always stops every
process it started (SuperLink, SuperNodes, and the SuperExec / ServerApp / ClientApp processes they spawn),
by process id and process group, also when something fails. Flower's state (``config.toml``, installed
app bundles) goes to ``FLWR_HOME`` in a temporary directory, never to ``~/.flwr``.

``simulate`` runs the same ServerApp and ClientApp in Flower's simulation engine: Ray when it is installed
(``pip install "flwr[simulation]"``), else an in-process backend that executes the ClientApps one after the
other in this process (same Flower simulation runtime: in-memory SuperLink state, Grid and messages).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legokit.config import ExperimentConfig
from legokit.utils import LegokitError, cache_dir

CONNECTION = "legokit"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """A Flower executable: next to this Python first (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise LegokitError(f"{name} not found next to {sys.executable} or on PATH: install flwr==1.42.0")
    return found


def check_superlink(address: str, timeout: float = 3.0, insecure: bool = True) -> None:
    """Raise a clear ``LegokitError`` naming ``address`` when no SuperLink answers there."""
    scheme = "http" if insecure else "https"
    url = f"{scheme}://{address}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status == 200:
                return
            reason = f"HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        reason = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = str(getattr(err, "reason", err))
    raise LegokitError(f"no SuperLink reachable at {address} (tried {url}: {reason}); is it started "
                       "(`flower-superlink --port PORT ...`) and is HOST:PORT its address?")


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process: private FLWR_HOME, no telemetry, legokit's cache pinned."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "LEGOKIT_CACHE": str(cache_dir().resolve()),
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    env.update(extra or {})
    return env


def write_connection(flwr_home: Path, address: str, insecure: bool = True,
                     root_certificates: str | None = None) -> None:
    """Write ``FLWR_HOME/config.toml`` with one SuperLink connection named ``legokit`` (what `flwr run` reads)."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    elif root_certificates:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


# ----- processes ---------------------------------------------------------------------------------------
@dataclass
class Proc:
    """One process we started, its log file and (for SuperNodes) its node config."""

    name: str
    popen: subprocess.Popen
    log: Path
    port: int
    node_config: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Flower's SuperExec starts some in new sessions)."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:  # psutil missing or the process is gone
        return []


def _signal_all(pids: list[int], groups: list[int], sig: int) -> None:
    for g in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, sig)
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def _alive(pid: int) -> bool:
    try:
        import psutil

        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except Exception:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def stop_process(proc: Proc, grace: float = 8.0) -> None:
    """Stop a process, its process group and every descendant: SIGTERM, then SIGKILL after ``grace`` s."""
    pids = [proc.pid, *_descendants(proc.pid)]
    groups = []
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            g = os.getpgid(p)
            if g != os.getpgrp() and g not in groups:  # never signal our own group
                groups.append(g)
    _signal_all(pids, groups, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and (proc.alive() or any(_alive(p) for p in pids[1:])):
        time.sleep(0.1)
    if proc.alive() or any(_alive(p) for p in pids[1:]):
        _signal_all(pids, groups, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(timeout=5)


def kill_process(proc: Proc) -> None:
    """Crash a process now (SIGKILL to it, its group and its descendants), as a power cut would."""
    pids = [proc.pid, *_descendants(proc.pid)]
    groups = []
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            g = os.getpgid(p)
            if g != os.getpgrp() and g not in groups:
                groups.append(g)
    _signal_all(pids, groups, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(timeout=5)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def node_config_arg(node_config: Mapping[str, Any]) -> str:
    """``{"partition-id": 0, "blocks-dir": "/x"}`` -> ``'partition-id=0 blocks-dir="/x"'`` (Flower's syntax)."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())


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
        log = self.logs / f"{name}.log"
        fh = open(log, "ab")  # the child inherits the descriptor; ours is closed right after the spawn
        try:
            popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, cwd=self.work_dir, start_new_session=True)
        finally:
            fh.close()
        return Proc(name, popen, log, port, dict(node_config or {}))

    def start_superlink(self, timeout: float = 60.0) -> Proc:
        """Start ``flower-superlink --insecure`` on a free port and wait for its /health."""
        port = free_port(self.host)
        cmd = [_bin("flower-superlink"), "--insecure", "--host", self.host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
        self.superlink = self._spawn("superlink", cmd, port)
        write_connection(self.flwr_home, self.address)
        deadline = time.time() + timeout
        while True:
            if not self.superlink.alive():
                raise LegokitError(f"the SuperLink exited (code {self.superlink.popen.returncode}):\n"
                                   f"{self.superlink.log_tail()}")
            try:
                check_superlink(self.address, timeout=1.0)
                return self.superlink
            except LegokitError:
                if time.time() > deadline:
                    raise LegokitError(f"the SuperLink did not become healthy within {timeout} s:\n"
                                       f"{self.superlink.log_tail()}") from None
                time.sleep(0.2)

    def start_supernode(self, node_config: Mapping[str, Any], name: str | None = None) -> Proc:
        """Start ``flower-supernode --insecure`` connected to our SuperLink (not waited for: see ``wait_nodes``)."""
        port = free_port(self.host)
        name = name or f"supernode-{len(self.supernodes)}"
        cmd = [_bin("flower-supernode"), "--insecure", "--superlink", self.address, "--host", self.host,
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
        return subprocess.run([_bin("flwr"), *args], env=self.env, cwd=self.work_dir, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def submit(self, app_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> tuple[int, Proc]:
        """``flwr run APP legokit --stream`` in the background; returns (Flower run id, the streaming process)."""
        check_superlink(self.address)
        cmd = [_bin("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
        if overrides:
            cmd += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items())]
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
           env: Mapping[str, str] | None = None, extra_nodes: list[dict] | None = None) -> dict:
    """Start a SuperLink and one SuperNode per client on loopback, run the experiment, stop them all.

    Args:
        cfg: the experiment (``fed.num_clients`` SuperNodes are started, ``partition-id`` 0..N-1).
        run_dir: the ServerApp's run directory (as ``legokit run --out``).
        clients: override ``fed.num_clients``.
        work_dir: logs and FLWR_HOME (default: a temporary directory, removed afterwards; logs are copied
            to ``run_dir/flower-logs``).
        timeout: seconds for the whole run; round_timeout: seconds per round (see ``LegoStrategy``).
        task_poll_interval: ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (Flower's default is 1 s).
        threads: torch CPU threads of each ClientApp (node config ``threads``); default: the CPU cores divided
            by the clients, since all ClientApps of a round train at once on this machine (oversubscribed
            OpenMP threads make small matmuls many times slower).
        env: extra environment for every Flower process (e.g. ``OMP_NUM_THREADS`` for the ServerApp too).
        extra_nodes: node configs of additional SuperNodes (tests: a SuperNode with a bad partition id).
    Returns:
        ``{"run_id", "status", "flower": <flwr ls record>, "summary": <run_dir/flower.json>, "seconds"}``.
    """
    from legokit.flower.runconfig import check_supported, write_app

    if clients is not None and clients != cfg.fed.num_clients:
        cfg = cfg.with_overrides({"fed.num_clients": clients})
    check_supported(cfg)
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
                            nodes_timeout=120.0)
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


# ----- the simulation engine -----------------------------------------------------------------------------
_RAYBACKEND = "flwr.server.superlink.fleet.vce.backend.raybackend"


def _inline_backend_class():
    from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
    from flwr.server.superlink.fleet.vce.backend.backend import Backend

    class InlineBackend(Backend):
        """Flower simulation backend that runs each ClientApp call in this process, one at a time."""

        def __init__(self, backend_config: dict) -> None:
            self.app_fn = None

        def build(self, app_fn) -> None:
            self.app_fn = app_fn

        @property
        def num_workers(self) -> int:
            return 1

        def is_worker_idle(self) -> bool:
            return True

        def terminate(self) -> None:
            pass

        def process_message(self, message, context):
            try:
                out = self.app_fn()(message=message, context=context)
            except LoadClientAppError:
                raise
            except Exception as ex:  # Flower turns this into an error reply
                raise ClientAppException(str(ex)) from ex
            return out, context

    return InlineBackend


@contextlib.contextmanager
def _simulation_backend(backend: str) -> Iterator[str]:
    """Yield the backend name for ``run_simulation``; "inline" plugs in ``InlineBackend`` for the duration.

    Flower 1.42's simulation runtime imports its Ray backend by module name; without Ray we register an
    in-process backend under that name while the simulation runs and restore the module table after.
    """
    import importlib.util

    has_ray = importlib.util.find_spec("ray") is not None
    if backend == "auto":
        backend = "ray" if has_ray else "inline"
    if backend == "ray":
        if not has_ray:
            raise LegokitError("backend 'ray' needs Ray: pip install 'flwr[simulation]==1.42.0' (or use 'inline')")
        yield "ray"
        return
    if backend != "inline":
        raise LegokitError(f"unknown simulation backend {backend!r}: use auto, ray or inline")
    import types

    saved = sys.modules.get(_RAYBACKEND)
    mod = types.ModuleType(_RAYBACKEND)
    mod.RayBackend = _inline_backend_class()
    sys.modules[_RAYBACKEND] = mod
    try:
        yield "inline"
    finally:
        if saved is None:
            sys.modules.pop(_RAYBACKEND, None)
        else:
            sys.modules[_RAYBACKEND] = saved


@contextlib.contextmanager
def _private_flower_home() -> Iterator[None]:
    """Keep the in-process simulation out of ``~/.flwr`` and turn Flower's telemetry off for this process.

    Flower's telemetry writes a ``source`` id to ``FLWR_HOME`` (default ``~/.flwr``) from a background thread
    on the first event of a process, whatever ``FLWR_TELEMETRY_ENABLED`` says; we create that id under a
    private FLWR_HOME first (the process caches it) and switch the POST off.
    """
    from flwr.supercore import telemetry

    telemetry.FLWR_TELEMETRY_ENABLED = "0"  # read when an event is sent; there is no network to send it to
    saved = os.environ.get("FLWR_HOME")
    with tempfile.TemporaryDirectory(prefix="legokit-flwr-home-") as home:
        if saved is None:
            os.environ["FLWR_HOME"] = home
        try:
            with telemetry.state_lock:
                if telemetry.state["source"] is None:
                    telemetry.state["source"] = telemetry._get_source_id()
            yield
        finally:
            if saved is None:
                os.environ.pop("FLWR_HOME", None)


def simulate(cfg: ExperimentConfig, run_dir: str | Path, *, backend: str = "auto", round_timeout: float = 3600.0,
             resume: bool = False) -> dict:
    """Run the experiment in Flower's simulation engine (one process; virtual SuperNodes 0..N-1).

    Flower state goes to a temporary FLWR_HOME unless ``FLWR_HOME`` is set; Flower's telemetry is off.

    Returns:
        ``{"summary": <run_dir/flower.json>, "backend", "seconds"}``.
    """
    import warnings

    from flwr.simulation import run_simulation

    from legokit.flower.client_app import make_client_app
    from legokit.flower.runconfig import check_supported, to_run_config
    from legokit.flower.server_app import make_server_app

    check_supported(cfg)
    run_dir = Path(run_dir).resolve()
    rc = to_run_config(cfg, run_dir=run_dir, round_timeout=round_timeout, resume=resume, nodes_timeout=60.0,
                       poll_interval=0.05)
    (run_dir / "flower.json").unlink(missing_ok=True)
    t0 = time.time()
    with _private_flower_home(), _simulation_backend(backend) as name, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}} if name == "ray" else {}
        run_simulation(server_app=make_server_app(rc), client_app=make_client_app(rc),
                       num_supernodes=cfg.fed.num_clients, backend_name=name, backend_config=config)
    summary_file = run_dir / "flower.json"
    if not summary_file.is_file():
        raise LegokitError(f"the simulation ended without a summary ({summary_file}): see the log above")
    return {"summary": json.loads(summary_file.read_text()), "backend": name, "seconds": round(time.time() - t0, 3)}
