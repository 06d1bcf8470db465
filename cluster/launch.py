"""``python -m cluster.launch CONFIG`` (what ``make serve`` runs): ``serve run CONFIG`` on a Ray of its own
that is closed to the network, for a single machine.

Plain ``serve run`` starts a local Ray whose control plane (GCS, raylet, object manager, worker gRPC ports,
the dashboard agent with its job-submission route) answers on the machine's address, without
authentication. Here, before Serve's CLI starts Ray:

- the node's address is the loopback one (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray's single-machine
  mode, which it uses on macOS and Windows, where no other node may join);
- Ray's token authentication is on (``RAY_AUTH_MODE=token``; ``ray.init`` generates the token in
  ``~/.ray/auth_token`` on first use), unless the environment says otherwise;
- the dashboard is off, unless ``--dashboard`` (then on 127.0.0.1 only).

``tests/integration/test_serve_run.py`` checks that every listening socket of the session is on loopback.
For a cluster of several machines see the README ("Hardening"): Ray must listen on the network there, with
token auth on every node and only the ports it names reachable.

Example:
    >>> closed_env({})["RAY_AUTH_MODE"], closed_env({"RAY_AUTH_MODE": "disabled"})["RAY_AUTH_MODE"]
    ('token', 'disabled')
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping


def closed_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment variables that close a single-machine Ray (what the caller set wins)."""
    out = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    return out | {k: v for k, v in env.items() if k in out}


def loopback_grpc() -> None:
    """``worker_process_setup_hook`` of every Ray worker of a closed session: Ray Serve 2.60 binds each
    replica's inter-deployment gRPC server to ``[::]:0``, hard-coded (ray/serve/_private/replica.py), the one
    socket Ray's single-machine mode leaves open; here it binds loopback instead (callers on this machine
    reach it at the node address, which is loopback too)."""
    try:
        from ray.serve._private import replica
    except ImportError:  # not a Serve worker's Ray, or a Ray that moved it: nothing to do
        return
    bind = replica.add_port_to_grpc_server

    def add_port(server: object, address: str) -> int:
        return bind(server, address.replace("[::]", "127.0.0.1", 1) if address.startswith("[::]") else address)

    replica.add_port_to_grpc_server = add_port


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cluster.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a Serve config (configs/default.yaml)")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (on 127.0.0.1 only)")
    args = p.parse_args(argv)
    os.environ.update(closed_env(os.environ))
    import ray
    from ray.serve.scripts import cli

    ray.init(include_dashboard=args.dashboard, dashboard_host="127.0.0.1", namespace="serve",
             runtime_env={"worker_process_setup_hook": "cluster.launch.loopback_grpc"})
    # Serve's own `serve run`, on the Ray started above (it connects to an initialized Ray as is).
    sys.exit(cli.main(args=["run", pinned(args.config)], prog_name="serve", standalone_mode=True))


def pinned(config: str) -> str:
    """``config``, or where version applications name an alias, the config with each pinned to the version
    it names now (``cluster.deploy.render``: application ``APP-vN``), so that a later ``python -m
    cluster.deploy`` after an alias move finds the old version by its name and moves blue/green."""
    import tempfile

    import yaml

    from cluster.deploy import pin, render

    with open(config) as f:
        rendered, renamed = render(yaml.safe_load(f))
    pin(rendered, {}, say=lambda line: None)  # the registry refuses to delete what is served
    if not renamed:
        return config
    out = tempfile.NamedTemporaryFile("w", prefix="modelfleet-", suffix=".yaml", delete=False)  # noqa: SIM115
    with out:
        yaml.safe_dump(rendered, out, sort_keys=False)
    print(f"serving {config} with versions pinned: {renamed} ({out.name})", file=sys.stderr)
    return out.name


if __name__ == "__main__":
    main()
