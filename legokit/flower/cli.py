"""``legokit flower ...``: run LEGO on Flower's deployment engine (loopback or real machines) or simulation engine.

    legokit flower up   --clients 3 --config quick --out runs/flower   # SuperLink + 3 SuperNodes, run, stop
    legokit flower sim  --config quick --out runs/flower-sim            # Flower's simulation engine
    legokit flower blocks --config exp.yaml --run-dir /srv/run           # extract the blocks to ship to devices
    legokit flower app  --out my-app --config exp.yaml --run-dir /srv/run  # a Flower app dir for `flwr run`
    legokit flower node --superlink HOST:9093 --partition-id 0 ...      # one SuperNode (a client device)
    legokit flower run  --app my-app --superlink HOST:9093              # submit the app to a SuperLink
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from legokit.utils import LegokitError


def _config(args: argparse.Namespace, preflight: bool = True):
    """The experiment of ``--config``, ``--set`` and ``--clients``; ``preflight``: check it against this machine and
    the model's shapes (``legokit.models.preflight``) and print its warnings, before anything is loaded."""
    from legokit.config import ExperimentConfig, load_config

    overrides = list(args.set or [])
    clients = getattr(args, "clients", None)
    if clients is not None:  # validated together with the other overrides (e.g. a client_sparsities of N entries)
        profile = load_config(args.config) if args.config else ExperimentConfig()
        overrides += _clients_overrides(profile, clients, overrides)
    cfg = load_config(args.config, overrides) if args.config else ExperimentConfig().with_overrides(overrides)
    if preflight:
        from legokit.models import warn_preflight  # the command line imports its stage when it runs

        warn_preflight(cfg)
    return cfg


def _clients_overrides(cfg, clients: int, overrides: list[str]) -> list[str]:
    """``--clients N`` as overrides: ``fed.num_clients``, and the profile's per-client lists cycled to N entries.

    A shipped profile lists one block (``fed.client_sparsities``) or device (``fed.devices``) per client of its own
    count, so ``--clients 3`` on the 4-client quick profile would contradict it. Client k keeps the profile's
    entry k mod its length, as clients without a list cycle through the levels; a list given in ``--set`` is
    the user's own and is not touched (it must then have N entries).
    """
    if clients < 1:
        raise LegokitError(f"--clients {clients}: a federation needs at least 1 client (one SuperNode each)")
    out = [f"fed.num_clients={clients}"]
    given = {o.split("=", 1)[0].strip() for o in overrides}
    for key in ("client_sparsities", "devices"):
        values = getattr(cfg.fed, key)
        if values is None or len(values) == clients or f"fed.{key}" in given:
            continue
        cycled = [values[k % len(values)] for k in range(clients)]
        out.append(f"fed.{key}={json.dumps(cycled)}")  # JSON is YAML
        print(f"legokit: note: --clients {clients}: the config's fed.{key} {values} (one per client) becomes "
              f"{cycled}; set fed.{key} with --set to choose each client's", file=sys.stderr, flush=True)
    return out


def _terminate_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks stop every process we started."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _print_rounds(run_dir: Path) -> None:
    """Per-round table of a finished run directory."""
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x.strip()]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    print(f"{'round':>5} {'clients':>7} {'failed':>8} {'loss (mean last)':>17} {'energy kept':>11} "
          f"{'bytes down':>11} {'bytes up':>10} {'seconds':>8}")
    for r in rounds:
        ok = [m for m in metrics if m["round"] == r["round"] and m["status"] == "ok"]
        loss = sum(m["loss_last"] for m in ok) / len(ok) if ok else float("nan")
        print(f"{r['round']:>5} {r['clients']:>7} {str(r.get('failed', [])):>8} {loss:>17.4f} "
              f"{r.get('energy_kept_mean', float('nan')):>11.3f} {r.get('bytes_down', 0):>11} "
              f"{r.get('bytes_up', 0):>10} {r.get('seconds', 0):>8.1f}")


def _secagg(args: argparse.Namespace) -> dict:
    """The SecAgg+ settings of ``--secagg`` / ``--secagg-threshold`` / ``--secagg-clip`` (run config keys)."""
    return {"secagg": args.secagg, "secagg_threshold": args.secagg_threshold, "secagg_clip": args.secagg_clip}


def _add_secagg(s: argparse.ArgumentParser) -> None:
    s.add_argument("--secagg", action="store_true",
                   help="aggregate with Flower's SecAgg+: the server sees only the sum (heteagg, heterofl)")
    s.add_argument("--secagg-threshold", type=int, default=2,
                   help="SecAgg+ shares needed to rebuild a mask; every round needs this many clients")
    s.add_argument("--secagg-clip", type=float, default=1.0,
                   help="SecAgg+ clipping range (a power of 2 >= 1) for the clients' masked updates")


def _cmd_up(args: argparse.Namespace) -> None:
    from legokit.flower.deployment import deploy

    _terminate_on_sigterm()
    cfg = _config(args)
    out = deploy(cfg, args.out, work_dir=args.work_dir, timeout=args.timeout, round_timeout=args.round_timeout,
                 resume=args.resume, threads=args.threads,
                 env={"OMP_NUM_THREADS": str(args.threads)} if args.threads else None, options=_secagg(args))
    run_dir = Path(args.out).resolve()
    _print_rounds(run_dir)
    traffic = out["flower"].get("network-traffic", {})
    print(f"\nFlower run {out['run_id']}: {out['status']} in {out['seconds']} s "
          f"({cfg.fed.num_clients} SuperNodes + 1 SuperLink on loopback, stopped). SuperLink traffic: "
          f"{traffic.get('inbound-bytes', '?')} B in, {traffic.get('outbound-bytes', '?')} B out. "
          f"Run directory {run_dir}")


def _cmd_sim(args: argparse.Namespace) -> None:
    from legokit.flower.simulation import simulate

    cfg = _config(args)
    out = simulate(cfg, args.out, backend=args.backend, resume=args.resume)
    _print_rounds(Path(args.out).resolve())
    print(f"\nsimulation ({out['backend']} backend): {cfg.fed.num_clients} virtual SuperNodes, {out['seconds']} s; "
          f"run directory {Path(args.out).resolve()}")


def _cmd_app(args: argparse.Namespace) -> None:
    from legokit.flower.runconfig import write_app

    cfg = _config(args, preflight=False)  # the app runs on the SuperLink's machine, not this one
    flower = {"run_dir": str(Path(args.run_dir).resolve()) if args.run_dir else "",
              "round_timeout": args.round_timeout, **_secagg(args)}
    d = write_app(args.out, cfg, **flower)
    print(f"wrote {d / 'pyproject.toml'}: submit it with `flwr run {d} <connection>` "
          f"or `legokit flower run --app {d} --superlink HOST:PORT`")


def _cmd_blocks(args: argparse.Namespace) -> None:
    from legokit.experiment import load_or_extract_blocks
    from legokit.models import load_model
    from legokit.utils import seed_everything

    cfg = _config(args)
    run_dir = Path(args.run_dir).resolve()
    seed_everything(cfg.seed)
    llm, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    blocks = load_or_extract_blocks(cfg, llm, tok, run_dir)
    print(f"{len(blocks)} blocks in {run_dir / 'blocks'}: {[b.id for b in blocks]}; copy that directory to each "
          "client device and give its SuperNode --blocks-dir")


def _tls_args(args: argparse.Namespace) -> list[str]:
    if args.insecure:
        return ["--insecure"]
    if not args.root_certificates:
        raise LegokitError("pass --insecure (loopback / trusted network only) or --root-certificates CA.pem (TLS)")
    return ["--root-certificates", str(Path(args.root_certificates).resolve())]


def _cmd_node(args: argparse.Namespace) -> None:
    from legokit.flower.processes import check_superlink, flower_executable, node_config_arg

    tls = _tls_args(args)
    check_superlink(args.superlink, insecure=args.insecure)
    nc: dict = {"partition-id": args.partition_id}
    for key in ("num_partitions", "blocks_dir", "block_id", "device", "threads"):
        value = getattr(args, key)
        if value is not None:
            nc[key.replace("_", "-")] = str(Path(value).resolve()) if key == "blocks_dir" else value
    cmd = [flower_executable("flower-supernode"), *tls, "--superlink", args.superlink, "--port", str(args.port),
           "--node-config", node_config_arg(nc)]
    if args.auth_private_key:
        cmd += ["--auth-supernode-private-key", args.auth_private_key]
    print("exec:", " ".join(cmd), flush=True)
    env = dict(os.environ)  # the SuperNode starts flower-superexec and flwr-clientapp from PATH: this venv's first
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    os.execve(cmd[0], cmd, env)


def _cmd_run(args: argparse.Namespace) -> None:
    from legokit.flower.processes import (
        CONNECTION,
        check_superlink,
        flower_env,
        flower_executable,
        write_connection,
    )

    _tls_args(args)
    check_superlink(args.superlink, insecure=args.insecure)
    with tempfile.TemporaryDirectory(prefix="legokit-flwr-home-") as home:
        write_connection(Path(home), args.superlink, insecure=args.insecure, root_certificates=args.root_certificates)
        cmd = [flower_executable("flwr"), "run", str(Path(args.app).resolve()), CONNECTION, "--stream"]
        if args.set:
            cmd += ["--run-config", " ".join(args.set)]  # Flower parses each value as TOML
        rc = subprocess.call(cmd, env=flower_env(Path(home)))
    if rc:
        raise LegokitError(f"`flwr run` exited with status {rc}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``flower`` (with up / sim / app / node / run) to the ``legokit`` command's subparsers."""
    p = sub.add_parser("flower", help="run LEGO on Flower: deployment engine (SuperLink + SuperNodes) or simulation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fs = p.add_subparsers(dest="flower_command", required=True)

    def experiment(s: argparse.ArgumentParser) -> None:
        s.add_argument("--config", default=None, help="a YAML file or a shipped profile (quick, full)")
        s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. fed.rounds=3")

    s = fs.add_parser("up", help="start a SuperLink and one SuperNode per client on loopback, run, stop them all")
    experiment(s)
    s.add_argument("--clients", type=int, default=None, help="number of clients / SuperNodes (fed.num_clients)")
    s.add_argument("--out", required=True, help="the run directory")
    s.add_argument("--resume", action="store_true", help="continue the run directory from its last finished round")
    s.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    s.add_argument("--round-timeout", type=float, default=3600.0, help="seconds a round waits for its clients")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads of every Flower process (ServerApp and each ClientApp); default: each ClientApp "
                        "gets cores / clients, the ServerApp all cores")
    s.add_argument("--work-dir", default=None, help="keep logs and FLWR_HOME here (default: a temporary dir; "
                                                    "logs are copied to OUT/flower-logs)")
    _add_secagg(s)
    s.set_defaults(func=_cmd_up)

    s = fs.add_parser("sim", help="run in Flower's simulation engine (Ray if installed, else in-process)")
    experiment(s)
    s.add_argument("--clients", type=int, default=None, help="number of virtual SuperNodes (fed.num_clients)")
    s.add_argument("--out", required=True, help="the run directory")
    s.add_argument("--backend", default="auto", choices=["auto", "ray", "inline"])
    s.add_argument("--resume", action="store_true")
    s.set_defaults(func=_cmd_sim)

    s = fs.add_parser("blocks", help="extract the blocks into RUN_DIR/blocks (to copy to client devices)")
    experiment(s)
    s.add_argument("--clients", type=int, default=None, help="fed.num_clients")
    s.add_argument("--run-dir", required=True, help="the ServerApp's run directory (the app's run-dir)")
    s.set_defaults(func=_cmd_blocks)

    s = fs.add_parser("app", help="write a Flower app directory (pyproject.toml) for `flwr run`")
    experiment(s)
    s.add_argument("--clients", type=int, default=None, help="fed.num_clients")
    s.add_argument("--out", required=True, help="the app directory to write")
    s.add_argument("--run-dir", default=None, help="the ServerApp's run directory on the SuperLink machine")
    s.add_argument("--round-timeout", type=float, default=3600.0)
    _add_secagg(s)
    s.set_defaults(func=_cmd_app)

    def connection(s: argparse.ArgumentParser) -> None:
        s.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink address")
        s.add_argument("--insecure", action="store_true", help="no TLS (loopback or a trusted network only)")
        s.add_argument("--root-certificates", default=None, metavar="CA.pem", help="CA that signed the SuperLink's "
                                                                                    "certificate (TLS)")

    s = fs.add_parser("node", help="start one SuperNode (a client) after checking its SuperLink is reachable")
    connection(s)
    s.add_argument("--partition-id", type=int, required=True, help="which client this node is (0..N-1)")
    s.add_argument("--num-partitions", type=int, default=None)
    s.add_argument("--blocks-dir", default=None, help="a copy of the server's <run-dir>/blocks")
    s.add_argument("--block-id", default=None, help="the block this device holds (e.g. wanda-unstructured-50)")
    s.add_argument("--device", default=None)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--port", type=int, default=9094, help="this SuperNode's local ClientApp API port")
    s.add_argument("--auth-private-key", default=None, help="SuperNode authentication: its private key")
    s.set_defaults(func=_cmd_node)

    s = fs.add_parser("run", help="submit a Flower app (see `legokit flower app`) to a SuperLink and stream its log")
    connection(s)
    s.add_argument("--app", required=True, help="the app directory")
    s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run config overrides")
    s.set_defaults(func=_cmd_run)


def main(argv: list[str] | None = None) -> int:
    """``python -m legokit.flower.cli ...`` (same as ``legokit flower ...`` once the lead wires it)."""
    parser = argparse.ArgumentParser(prog="legokit")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["flower", *(argv if argv is not None else sys.argv[1:])])
    try:
        args.func(args)
    except LegokitError as err:
        print(f"legokit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
