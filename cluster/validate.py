"""``python -m cluster.validate CONFIG.yaml``: check a Serve config's modelfleet args before deploying.

``serve run CONFIG.yaml`` builds applications inside the Serve controller: an invalid config is reported there
(the message appears in serve run's output within seconds and ``serve status`` shows DEPLOY_FAILED), but Ray's
CLI keeps running. ``make serve`` runs this check first, so a bad config fails at once with the field named.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from cluster.app import ConfigError, gateway, parse_config, resolve_source


def validate_file(path: str | Path) -> list[str]:
    """Validate every modelfleet application in a Serve config; returns a summary line per application."""
    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("applications"), list):
        raise ConfigError(f"{path}: not a Serve config (no 'applications' list)")
    lines = []
    for app in doc["applications"]:
        if app.get("import_path") != "cluster.app:build":
            continue
        cfg = parse_config(app.get("args") or {})
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
