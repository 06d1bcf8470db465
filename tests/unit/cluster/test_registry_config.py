"""``models:/`` sources in a config: resolved in the registry at build and at validation (an unknown name,
version or alias fails naming it), pinned for the app, and reported by the router's /v1/models."""

from __future__ import annotations

import pytest

from cluster.app import ConfigError, build, resolve_source
from cluster.registry import open_registry
from cluster.validate import main as validate
from tests.conftest import REPO

DRAFT = REPO / "models" / "tiny-code-llama-draft"


def _config(db: str, source: str) -> dict:
    return {"models": [{"name": "tiny", "source": source}], "registry": db}


def _routes(app) -> list:
    return app._bound_deployment.init_args[1]


def test_models_uris_resolve_pin_and_report_their_version(tmp_path):
    db = str(tmp_path / "registry.db")
    reg = open_registry(db)
    v1, created = reg.register("tiny", DRAFT, alias="production")
    assert created and v1.version == 1
    assert resolve_source("models:/tiny/1", db) == str(DRAFT.resolve())
    assert resolve_source("models:/tiny@production", db) == str(DRAFT.resolve())
    app = build(_config(db, "models:/tiny@production"))
    route = _routes(app)[0]
    assert (route.version, route.sha256) == ("1", v1.sha256)
    assert [(p.app, p.served_name, p.version) for p in reg.pins_of("tiny", 1)] == [("modelfleet", "tiny", 1)]
    plain = build({"models": [{"name": "tiny", "source": str(DRAFT)}], "registry": db})
    assert _routes(plain)[0].version == ""  # a folder source has no registry version


@pytest.mark.parametrize("source,named", [("models:/nope/1", "nope"), ("models:/tiny/9", "no version 9"),
                                          ("models:/tiny@canary", "no alias 'canary'")])
def test_an_unknown_name_version_or_alias_fails_validation_naming_it(tmp_path, capsys, source, named):
    db = str(tmp_path / "registry.db")
    open_registry(db).register("tiny", DRAFT)
    with pytest.raises(ConfigError, match=named):
        build(_config(db, source))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("applications:\n  - name: x\n    import_path: cluster.app:build\n"
                   f"    args: {{models: [{{name: m, source: '{source}'}}], registry: '{db}'}}\n")
    assert validate([str(cfg)]) == 1
    assert named in capsys.readouterr().err
