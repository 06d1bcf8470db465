"""``cluster.deploy`` without a cluster: alias sources pinned and renamed, the blue/green phases, the version
table's validation (``cluster.validate``), version applications' args."""

from __future__ import annotations

import doctest

import pytest

from cluster import deploy as deploy_module
from cluster.app import ConfigError, build_version
from cluster.deploy import phases, render
from cluster.registry import open_registry
from cluster.validate import validate_doc
from tests.conftest import REPO

TARGET, DRAFT = str(REPO / "models" / "tiny-code-llama"), str(REPO / "models" / "tiny-code-llama-draft")


def doc(registry: str, source: str = "models:/tiny@production", table: dict | None = None) -> dict:
    return {"applications": [
        {"name": "modelfleet", "route_prefix": "/", "import_path": "cluster.app:build", "args": {"models": []},
         "deployments": [{"name": "modelfleet-router", "user_config": {"models": table or {
             "tiny": {"versions": {"tiny-prod": 100}}}}}]},
        {"name": "tiny-prod", "route_prefix": None, "import_path": "cluster.app:build_version",
         "args": {"model": {"name": "tiny", "source": source}, "registry": registry}}]}


@pytest.fixture()
def registry(tmp_path):
    path = str(tmp_path / "reg.db")
    reg = open_registry(path)
    reg.register("tiny", TARGET)
    reg.register("tiny", DRAFT)
    reg.set_alias("tiny", "production", 1)
    return path


def test_doctests():
    assert doctest.testmod(deploy_module).failed == 0


def test_an_alias_source_is_pinned_and_its_application_renamed(registry):
    rendered, renamed = render(doc(registry))
    assert renamed == {"tiny-prod": "tiny-prod-v1"}
    app = rendered["applications"][1]
    assert (app["name"], app["args"]["model"]["source"]) == ("tiny-prod-v1", "models:/tiny/1")
    table = rendered["applications"][0]["deployments"][0]["user_config"]["models"]["tiny"]
    assert table["versions"] == {"tiny-prod-v1": 100}
    open_registry(registry).set_alias("tiny", "production", 2)
    assert render(doc(registry))[1] == {"tiny-prod": "tiny-prod-v2"}
    assert render(doc(registry, "models:/tiny/2"))[1] == {}  # a number does not move: no rename


def test_a_move_deploys_side_by_side_first_then_as_written(registry):
    live_v1 = render(doc(registry))[0]["applications"][1]
    open_registry(registry).set_alias("tiny", "production", 2)
    rendered, renamed = render(doc(registry))
    steps, moves = phases(rendered, renamed, {"modelfleet": {}, "tiny-prod-v1": live_v1, "other-v1": {}})
    assert moves == {"tiny-prod-v1": "tiny-prod-v2"} and len(steps) == 2
    side, final = steps
    assert [a["name"] for a in side["applications"]] == ["modelfleet", "tiny-prod-v2", "tiny-prod-v1"]
    assert side["applications"][0]["deployments"][0]["user_config"]["models"]["tiny"]["versions"] == {
        "tiny-prod-v2": 100, "tiny-prod-v1": 0}  # the old one listed at 0: it answers until v2 is ready
    assert final is rendered
    assert phases(rendered, renamed, {"tiny-prod-v2": {}})[1] == {}  # already there: one step


def test_the_version_table_names_real_version_applications(registry):
    assert any("tiny -> tiny-prod 100" in line for line in validate_doc(doc(registry)))
    bad = doc(registry, table={"tiny": {"versions": {"nope": 1}}})
    with pytest.raises(ConfigError, match=r"'nope', which is not a cluster\.app:build_version application"):
        validate_doc(bad)
    with pytest.raises(ConfigError, match=r"serves 'tiny' .*not 'other'"):
        validate_doc(doc(registry, table={"other": {"versions": {"tiny-prod": 1}}}))
    with pytest.raises(ConfigError, match="the version table"):
        validate_doc(doc(registry, table={"tiny": {"versions": {"tiny-prod": -1}}}))
    with pytest.raises(ConfigError, match="nope"):
        validate_doc(doc(registry, "models:/tiny@nope"))
    exposed = doc(registry)
    exposed["applications"][1]["route_prefix"] = "/tiny"
    with pytest.raises(ConfigError, match="route_prefix: null"):
        validate_doc(exposed)


def test_build_version_binds_one_deployment_named_after_the_model(registry):
    app = build_version({"model": {"name": "tiny", "source": "models:/tiny@production"}, "registry": registry})
    assert app._bound_deployment.name == "tiny"
    kwargs = app._bound_deployment.init_kwargs
    assert kwargs["version"] == "1" and len(kwargs["sha256"]) == 64
    with pytest.raises(ConfigError, match="speculative placement 'separate'"):
        build_version({"model": {"name": "t", "source": TARGET, "speculative": {"draft": DRAFT,
                                                                              "placement": "separate"}}})
