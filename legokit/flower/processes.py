"""Flower's processes: find their executables, give them an environment, start, watch and stop them.

What every way of running Flower as separate processes needs (``deployment.Deployment`` on loopback and
``legokit flower node`` / ``run`` across machines): a free port, Flower's executables (``flower-superlink``,
``flower-supernode``, ``flwr``), their environment (a private ``FLWR_HOME``, telemetry off), the ``flwr``
CLI's connection file, the ``--node-config`` / ``--run-config`` syntax, a SuperLink's health, and processes
started each in its own process group and stopped with every descendant (Flower's SuperExec starts the
ServerApp / ClientApp processes, some in new sessions).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legokit.utils import LegokitError, cache_dir

CONNECTION = "legokit"  # the SuperLink connection that ``write_connection`` writes and ``flwr run`` names


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flower_executable(name: str) -> str:
    """A Flower executable (``flwr``, ``flower-superlink``, ...): next to this Python first (the venv), else on PATH."""
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


def toml_value(v: Any) -> str:
    """One value in Flower's ``KEY=VALUE`` syntax (``--node-config``, ``--run-config``): a TOML literal."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def node_config_arg(node_config: Mapping[str, Any]) -> str:
    """``{"partition-id": 0, "blocks-dir": "/x"}`` -> ``'partition-id=0 blocks-dir="/x"'`` (Flower's syntax)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())


# ----- processes we start --------------------------------------------------------------------------------
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


def start_process(name: str, cmd: list[str], *, log: Path, env: Mapping[str, str], cwd: Path, port: int = 0,
                  node_config: Mapping[str, Any] | None = None) -> Proc:
    """Start ``cmd`` in a new session (its own process group), stdout and stderr appended to ``log``."""
    fh = open(log, "ab")  # the child inherits the descriptor; ours is closed right after the spawn
    try:
        popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=cwd, start_new_session=True)
    finally:
        fh.close()
    return Proc(name, popen, log, port, dict(node_config or {}))


def wait_superlink(proc: Proc, address: str, timeout: float = 60.0) -> None:
    """Wait until the SuperLink ``proc`` answers on ``address``'s /health; raise with its log if it exits first."""
    deadline = time.time() + timeout
    while True:
        if not proc.alive():
            raise LegokitError(f"the SuperLink exited (code {proc.popen.returncode}):\n{proc.log_tail()}")
        try:
            check_superlink(address, timeout=1.0)
            return
        except LegokitError:
            if time.time() > deadline:
                raise LegokitError(f"the SuperLink did not become healthy within {timeout} s:\n"
                                   f"{proc.log_tail()}") from None
            time.sleep(0.2)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Flower's SuperExec starts some in new sessions); [] without psutil."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:  # psutil missing or the process is gone
        return []


def _groups(pids: list[int]) -> list[int]:
    """The process groups of ``pids``, never our own."""
    groups = []
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            g = os.getpgid(p)
            if g != os.getpgrp() and g not in groups:  # never signal our own group
                groups.append(g)
    return groups


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
    pids = [proc.pid, *descendants(proc.pid)]
    groups = _groups(pids)
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
    pids = [proc.pid, *descendants(proc.pid)]
    _signal_all(pids, _groups(pids), signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(timeout=5)
