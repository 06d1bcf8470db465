"""``python -m cluster.validate CONFIG.yaml``: check a Serve config's modelfleet args before deploying.

``serve run CONFIG.yaml`` builds applications inside the Serve controller: an invalid config is reported there
(the message appears in serve run's output within seconds and ``serve status`` shows DEPLOY_FAILED), but Ray's
CLI keeps running. ``make serve`` runs this check first, so a bad config fails at once with the field named.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cluster.app import ROUTER_NAME, ConfigError, gateway, parse_config, parse_version_config, resolve_source
from cluster.config import ClusterConfig
from deployments.ingress.versions import VersionTable


def validate_file(path: str | Path) -> list[str]:
    """Validate every modelfleet application in a Serve config; returns a summary line per application."""
    return validate_doc(yaml.safe_load(Path(path).read_text()), str(path))


def validate_doc(doc: object, path: str = "the config") -> list[str]:
    """``validate_file`` of a parsed config."""
    if not isinstance(doc, dict) or not isinstance(doc.get("applications"), list):
        raise ConfigError(f"{path}: not a Serve config (no 'applications' list)")
    lines = []
    versions = {}  # version application -> (model name, kind)
    for app in doc["applications"]:
        if app.get("import_path") == "cluster.app:build_version":
            v = parse_version_config(app.get("args") or {})
            resolve_source(v.model.source, v.registry)
            if app.get("route_prefix", "/") is not None:
                raise ConfigError(f"version application {app.get('name')!r}: set route_prefix: null (the router "
                                  "answers for it)")
            versions[app.get("name", "default")] = (v.model.name, v.model.kind)
            lines.append(f"{app.get('name', 'default')}: version of {v.model.name} ({v.model.kind}, {v.model.engine})")
    for app in doc["applications"]:
        if app.get("import_path") != "cluster.app:build":
            continue
        cfg = parse_config(app.get("args") or {})
        lines += check_table(app, cfg, versions)
        for m in cfg.models:
            resolve_source(m.source, cfg.registry)  # a models:/ source: its name, version or alias exists
        gate = gateway(cfg)  # the key file exists and parses; CORS and Host entries are valid
        if gate.keys_file is not None:
            from deployments.gateway.keys import load

            try:
                load(gate.keys_file)
            except (ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"gateway.auth.keys_file: {err}") from None
        models = ", ".join(f"{m.name} ({m.kind}, {m.engine})" for m in cfg.models)
        lines.append(f"{app.get('name', 'default')}: {models}")
    return lines


def check_table(app: dict, cfg: ClusterConfig, versions: dict[str, tuple[str, str]]) -> list[str]:
    """The router's version table (its user_config): valid, naming version applications of this file that
    serve the model under the same name and kind, and no model both the router's own and versioned."""
    table = router_table(app)
    if table is None:
        return []
    try:
        t = VersionTable.model_validate(table)
    except ValidationError as err:
        raise ConfigError(f"{ROUTER_NAME} user_config (the version table): {err}") from None
    own = {m.name for m in cfg.models}
    out = []
    for model, vm in t.models.items():
        if model in own:
            raise ConfigError(f"model {model!r} is both in models and in the version table: name it once")
        for name in [*vm.versions, *([vm.shadow.app] if vm.shadow else [])]:
            if name not in versions:
                raise ConfigError(f"version table: {model!r} names application {name!r}, which is not a "
                                  "cluster.app:build_version application of this config")
            if versions[name] != (model, vm.kind):
                raise ConfigError(f"version table: application {name!r} serves {versions[name][0]!r} "
                                  f"({versions[name][1]}), not {model!r} ({vm.kind})")
        weights = ", ".join(f"{a} {w:g}" for a, w in vm.versions.items())
        out.append(f"{app.get('name', 'default')}: {model} -> {weights}"
                   + (f"; shadow {vm.shadow.app} ({vm.shadow.fraction:.0%})" if vm.shadow else "")
                   + (f"; canary analysis of {vm.analysis.canary}" if vm.analysis else ""))
    return out


def router_table(app: dict) -> Any:
    """The router's version table in one application of a Serve config (its ``user_config``), as written."""
    return next((d["user_config"] for d in app.get("deployments") or []
                 if d.get("name") == ROUTER_NAME and d.get("user_config") is not None), None)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m cluster.validate CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        for line in validate_file(argv[0]):
            print(f"ok {line}")
    except (ConfigError, OSError, yaml.YAMLError) as err:
        print(f"{argv[0]}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
