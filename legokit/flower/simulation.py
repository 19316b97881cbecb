"""Flower's simulation engine: the same ServerApp and ClientApp in this process, virtual SuperNodes 0..N-1.

``simulate`` runs them with Ray when it is installed (``pip install "flwr[simulation]"``), else with an
in-process backend that executes the ClientApps one after the other in this process (same Flower simulation
runtime: in-memory SuperLink state, Grid and messages). Flower's state goes to a temporary ``FLWR_HOME``
(unless one is set) and its telemetry is off.

Flower 1.42 has no public API for three things this needs; each workaround is one small function whose
docstring says "Flower 1.42 needs this because ...": ``_plug_in_backend`` (a backend other than Ray),
``_telemetry_post_off`` (no telemetry) and ``_pin_telemetry_source`` (nothing written to ``~/.flwr``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from legokit.config import ExperimentConfig
from legokit.flower.client_app import make_client_app
from legokit.flower.runconfig import check_supported, to_run_config
from legokit.flower.server_app import make_server_app
from legokit.utils import LegokitError

# The module Flower 1.42's simulation engine imports its backend from (``RayBackend``), whatever backend it is asked
# for; ``simulation_backend("inline")`` puts the in-process backend there while a simulation runs.
RAY_BACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"


# ----- the backend: Ray, or the ClientApps in this process -----------------------------------------------
def _inline_backend_class() -> type:
    """``InlineBackend``: a Flower simulation ``Backend`` that runs each ClientApp call in this process.

    It implements the interface of Flower's own backends (``flwr.server.superlink.fleet.vce.backend.Backend``,
    the exceptions the engine turns into error replies); Flower loads it only through ``_plug_in_backend``.
    """
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
def _plug_in_backend(backend_class: type) -> Iterator[None]:
    """Make Flower's simulation engine use ``backend_class`` while the ``with`` block runs; restore after.

    Flower 1.42 needs this because its simulation engine has no backend registry: whatever ``backend_name``
    ``run_simulation`` gets, the engine does ``from .backend.raybackend import RayBackend`` (see
    ``flwr.server.superlink.fleet.vce.vce_api``), so without Ray the only way in is a module under that name
    in ``sys.modules`` whose ``RayBackend`` is our class. A public way to register a backend class (or to
    pass one to ``run_simulation``) would replace this function.
    """
    import types

    saved = sys.modules.get(RAY_BACKEND_MODULE)
    mod = types.ModuleType(RAY_BACKEND_MODULE)
    mod.RayBackend = backend_class
    sys.modules[RAY_BACKEND_MODULE] = mod
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop(RAY_BACKEND_MODULE, None)
        else:
            sys.modules[RAY_BACKEND_MODULE] = saved


@contextlib.contextmanager
def simulation_backend(backend: str) -> Iterator[str]:
    """Yield the backend name for ``run_simulation``: "ray", or "inline" (``InlineBackend`` plugged in meanwhile).

    ``backend``: "auto" (Ray when it is installed, else inline), "ray" or "inline".
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
    with _plug_in_backend(_inline_backend_class()):
        yield "inline"


# ----- Flower's state and telemetry ----------------------------------------------------------------------
def _telemetry_post_off() -> None:
    """Stop Flower from sending telemetry events from this process (for the rest of the process).

    Flower 1.42 needs this because it reads ``FLWR_TELEMETRY_ENABLED`` once, when ``flwr.supercore.telemetry``
    is first imported, into a module global that every event checks before its POST; setting the environment
    variable later (``simulate`` has imported flwr by then, and so may the caller) changes nothing. A telemetry
    switch read when an event is sent (or a ``run_simulation`` argument) would replace this function; Flower
    processes we start get ``FLWR_TELEMETRY_ENABLED=0`` in their environment instead (``processes.flower_env``).
    """
    from flwr.supercore import telemetry

    telemetry.FLWR_TELEMETRY_ENABLED = "0"  # read when an event is sent; there is no network to send it to


def _pin_telemetry_source() -> None:
    """Create Flower's telemetry ``source`` id now, under the current ``FLWR_HOME``, and cache it for the process.

    Flower 1.42 needs this because its first telemetry event of a process (``run_simulation`` sends one)
    writes ``FLWR_HOME/source`` (default ``~/.flwr/source``) from a background thread, even when telemetry
    is off; that thread may run after ``private_flower_home`` restored the environment and write to the
    user's ``~/.flwr``. Filling Flower's cached ``state["source"]`` first, while the private FLWR_HOME is
    set, keeps the write there. Flower not touching ``FLWR_HOME`` when telemetry is disabled would replace
    this function.
    """
    from flwr.supercore import telemetry

    with telemetry.state_lock:
        if telemetry.state["source"] is None:
            telemetry.state["source"] = telemetry._get_source_id()


@contextlib.contextmanager
def private_flower_home() -> Iterator[None]:
    """Keep the in-process simulation out of ``~/.flwr`` and turn Flower's telemetry off for this process.

    ``FLWR_HOME`` is a temporary directory while the ``with`` block runs, unless it is set already.
    """
    _telemetry_post_off()
    saved = os.environ.get("FLWR_HOME")
    with tempfile.TemporaryDirectory(prefix="legokit-flwr-home-") as home:
        if saved is None:
            os.environ["FLWR_HOME"] = home
        try:
            _pin_telemetry_source()
            yield
        finally:
            if saved is None:
                os.environ.pop("FLWR_HOME", None)


# ----- one call ------------------------------------------------------------------------------------------
def simulate(cfg: ExperimentConfig, run_dir: str | Path, *, backend: str = "auto", round_timeout: float = 3600.0,
             resume: bool = False) -> dict:
    """Run the experiment in Flower's simulation engine (one process; virtual SuperNodes 0..N-1).

    Flower state goes to a temporary FLWR_HOME unless ``FLWR_HOME`` is set; Flower's telemetry is off.

    Returns:
        ``{"summary": <run_dir/flower.json>, "backend", "seconds"}``.
    """
    import warnings

    from flwr.simulation import run_simulation


    check_supported(cfg)
    run_dir = Path(run_dir).resolve()
    rc = to_run_config(cfg, run_dir=run_dir, round_timeout=round_timeout, resume=resume, nodes_timeout=60.0,
                       poll_interval=0.05)
    (run_dir / "flower.json").unlink(missing_ok=True)
    t0 = time.time()
    with private_flower_home(), simulation_backend(backend) as name, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}} if name == "ray" else {}
        run_simulation(server_app=make_server_app(rc), client_app=make_client_app(rc),
                       num_supernodes=cfg.fed.num_clients, backend_name=name, backend_config=config)
    summary_file = run_dir / "flower.json"
    if not summary_file.is_file():
        raise LegokitError(f"the simulation ended without a summary ({summary_file}): see the log above")
    return {"summary": json.loads(summary_file.read_text()), "backend": name, "seconds": round(time.time() - t0, 3)}
