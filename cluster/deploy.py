"""``python -m cluster.deploy CONFIG``: apply a Serve config to the running cluster, moving versions blue/green.

What ``serve deploy`` does (the controller's declarative apply; it needs no dashboard), plus what Serve
cannot know about model versions:

- a version application whose source moves (``models:/NAME@ALIAS``, ``models:/NAME/latest``) is pinned to the
  version the alias names now: its source becomes ``models:/NAME/N`` and its name ``APP-vN`` (the router's
  tables follow). An alias moved since the last deploy so means a *new* application beside the old one;
  Serve would otherwise restart the application in place (stop first), or not notice the move at all;
- when an application ``APP-vM`` of another version is live, the move is blue/green: (1) the new version is
  deployed beside the old one, the table giving it the old one's weight and the old one 0; the routers keep
  sending to the old one until the new one answers ready (``deployments/ingress/traffic.py``); (2) once every
  router routes to the new version and the old one has no request in flight, the config is applied as written:
  Serve deletes the old application, whose replicas finish what they still hold (graceful shutdown).
  Rollback is the same move back: point the alias at the old version and deploy again;
- the registry learns which versions the cluster serves (its pins: ``delete`` refuses them).

Example (no cluster needed to render):
    >>> doc = {"applications": [{"name": "tiny-prod", "import_path": "cluster.app:build_version",
    ...         "args": {"model": {"name": "tiny", "source": "models/tiny-code-llama"}}}]}
    >>> render(doc)[0]["applications"][0]["name"]  # a folder source does not move: no rename
    'tiny-prod'
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import yaml

from cluster.app import ROUTER_NAME, ConfigError, parse_version_config, resolve_version
from cluster.registry import is_model_uri, open_registry
from cluster.registry.uri import parse_uri
from cluster.validate import router_table, validate_doc

VERSION_APP = "cluster.app:build_version"
ROUTER_APP = "cluster.app:build"


def _tables(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The routers' version tables (their ``user_config``), editable in place."""
    tables = (router_table(app) for app in doc.get("applications", []) if app.get("import_path") == ROUTER_APP)
    return [t for t in tables if isinstance(t, dict)]


def render(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The config with moving sources pinned and their applications renamed; and base name -> rendered name."""
    doc = copy.deepcopy(doc)
    renamed: dict[str, str] = {}
    for app in doc.get("applications", []):
        if app.get("import_path") != VERSION_APP:
            continue
        cfg = parse_version_config(app.get("args") or {})
        src = cfg.model.source
        if not is_model_uri(src) or parse_uri(src).version is not None:
            continue
        found = resolve_version(src, cfg.registry)
        app["args"]["model"]["source"] = found.uri
        renamed[app["name"]] = app["name"] = f"{app['name']}-v{found.version}"
    for table in _tables(doc):
        for vm in (table.get("models") or {}).values():
            vm["versions"] = {renamed.get(a, a): w for a, w in vm.get("versions", {}).items()}
            if vm.get("shadow"):
                vm["shadow"]["app"] = renamed.get(vm["shadow"]["app"], vm["shadow"]["app"])
            if vm.get("analysis"):
                vm["analysis"]["canary"] = renamed.get(vm["analysis"]["canary"], vm["analysis"]["canary"])
    return doc, renamed


def phases(rendered: dict[str, Any], renamed: dict[str, str], live: dict[str, dict[str, Any]]
           ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The configs to apply in order, and the moves (old application -> new) they make: one config when no
    live application holds another version of a renamed one, else the side-by-side config first."""
    moves = {}
    for base, new in renamed.items():
        for name in live:
            if name != new and re.fullmatch(re.escape(base) + r"-v[1-9][0-9]*", name):
                moves[name] = new
    if not moves:
        return [rendered], {}
    side = copy.deepcopy(rendered)
    side["applications"] += [copy.deepcopy(live[old]) for old in moves]
    for table in _tables(side):
        for vm in (table.get("models") or {}).values():
            for old, new in moves.items():
                if new in vm.get("versions", {}):
                    vm["versions"][old] = 0  # listed, drained: it answers until the new one is ready
    return [side, rendered], moves


class Cluster:
    """The running Serve instance, through the controller (``ray.init`` must have connected)."""

    def __init__(self) -> None:
        from ray.serve.context import _get_global_client

        self.client = _get_global_client()

    def live(self) -> dict[str, dict[str, Any]]:
        """Declaratively deployed applications -> their config as deployed."""
        details = self.client.get_serve_details()
        return {name: a["deployed_app_config"] for name, a in (details.get("applications") or {}).items()
                if a.get("deployed_app_config") is not None}

    def apply(self, doc: dict[str, Any]) -> None:
        from ray.serve.schema import ServeDeploySchema

        self.client.deploy_apps(ServeDeploySchema.model_validate(doc))

    def gone(self, names: set[str]) -> bool:
        return not names & {s.name for s in self.client.list_serve_statuses()}

    def running(self, names: set[str]) -> bool:
        statuses = {s.name: s.app_status.status for s in self.client.list_serve_statuses()}
        return all(str(statuses.get(n, "")).endswith("RUNNING") for n in names)

    def traffic(self, router_app: str) -> dict[str, Any]:
        from ray import serve

        return serve.get_deployment_handle(ROUTER_NAME, app_name=router_app).traffic_status.remote().result(
            timeout_s=10)


def _wait(what: str, ok: Callable[[], bool], timeout_s: float, say: Callable[[str], None]) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)
    say(f"  {what}: yes")


def switched(cluster: Cluster, routers: list[str], moves: dict[str, str], polls: int = 8) -> bool:
    """Every router replica asked (``polls`` calls each, spread over its replicas) routes to the new versions
    and holds nothing in flight on the old ones."""
    for app in routers:
        for _ in range(polls):
            for versions in cluster.traffic(app).values():
                by_app = {v["app"]: v for v in versions}
                for old, new in moves.items():
                    if new in by_app and (not by_app[new]["ready"] or by_app.get(old, {}).get("in_flight", 0)):
                        return False
    return True


def deploy(doc: dict[str, Any], cluster: Cluster, timeout_s: float = 900.0,
           say: Callable[[str], None] = print) -> dict[str, str]:
    """Apply ``doc`` (blue/green where a version moves); returns the moves made (old app -> new app)."""
    validate_doc(doc)
    rendered, renamed = render(doc)
    steps, moves = phases(rendered, renamed, cluster.live())
    routers = [a["name"] for a in rendered["applications"] if a.get("import_path") == ROUTER_APP]
    for i, step in enumerate(steps):
        names = {a["name"] for a in step["applications"]}
        say(f"applying {'the side-by-side config' if i < len(steps) - 1 else 'the config'}: {sorted(names)}")
        cluster.apply(step)
        _wait("every application running", lambda n=names: cluster.running(n), timeout_s, say)
        if i < len(steps) - 1:
            _wait(f"the routers moved {moves} and drained the old versions",
                  lambda: switched(cluster, routers, moves), timeout_s, say)
    if moves:  # Serve deletes them in the background: their replicas finish what they hold, then stop
        _wait(f"{sorted(moves)} deleted", lambda: cluster.gone(set(moves)), timeout_s, say)
    pin(rendered, moves, say)
    return moves


def pin(rendered: dict[str, Any], moves: dict[str, str], say: Callable[[str], None]) -> None:
    """Tell the registry which version each version application serves (``delete`` refuses those)."""
    for app in rendered["applications"]:
        if app.get("import_path") != VERSION_APP:
            continue
        cfg = parse_version_config(app["args"])
        if not is_model_uri(cfg.model.source):
            continue
        found = resolve_version(cfg.model.source, cfg.registry)
        registry = open_registry(cfg.registry)
        registry.unpin_app(app["name"])
        registry.pin(app["name"], cfg.model.name, found.model, found.version)
        for old in (o for o, n in moves.items() if n == app["name"]):
            registry.unpin_app(old)
            say(f"registry: {old} no longer served; {app['name']} serves {found.uri}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m cluster.deploy", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a Serve config")
    p.add_argument("--address", default="auto", help="the Ray cluster (default: this machine's)")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per phase")
    p.add_argument("--dry-run", action="store_true", help="print the configs it would apply, apply nothing")
    args = p.parse_args(argv)
    if args.address == "auto" or args.address.startswith(("127.", "localhost")):
        # this machine's cluster: make serve's is closed (loopback, token auth). Ray reads these when it is
        # imported, so a process without them starts again with them (the caller's environment wins).
        from cluster.launch import closed_env

        env = closed_env(os.environ)
        if any(os.environ.get(k) != v for k, v in env.items()):
            os.execve(sys.executable, [sys.executable, "-m", "cluster.deploy", *argv], {**os.environ, **env})
    try:
        with open(args.config) as f:
            doc = yaml.safe_load(f)
        if args.dry_run:
            print(yaml.safe_dump(render(doc)[0], sort_keys=False))
            return 0
        import ray

        ray.init(address=args.address, namespace="serve", log_to_driver=False)
        moves = deploy(doc, Cluster(), args.timeout_s, say=lambda line: print(line, flush=True))
        print(f"deployed {args.config}" + (f"; moved {moves}" if moves else ""))
        return 0
    except (ConfigError, OSError, yaml.YAMLError, TimeoutError) as err:
        print(f"{args.config}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
