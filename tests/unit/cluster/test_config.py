from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from cluster.config import ClusterConfig
from tests.conftest import REPO


def _cfg(**model) -> dict:
    return {"models": [{"name": "m", "source": "models/tiny-code-llama", **model}]}


def test_defaults():
    cfg = ClusterConfig.model_validate(_cfg())
    m = cfg.models[0]
    assert (m.kind, m.engine, m.num_replicas, m.resources.num_cpus) == ("llm", "native", 1, 1.0)
    assert m.engine_options.max_num_seqs == 32


@pytest.mark.parametrize("model, field", [
    ({"engine": "tgi"}, "engine"),
    ({"kind": "vision"}, "kind"),
    ({"name": "bad name!"}, "name"),
    ({"engine_options": {"max_num_seqs": 0}}, "max_num_seqs"),
    ({"engine_options": {"block_size": 12}}, "block_size"),
    ({"engine_options": {"dtypo": "float32"}}, "dtypo"),
    ({"replicas": 2}, "replicas"),
    ({"resources": {"num_cpus": -1}}, "num_cpus"),
])
def test_bad_fields_are_named(model, field):
    with pytest.raises(ValidationError, match=field):
        ClusterConfig.model_validate(_cfg(**model))


@pytest.mark.parametrize("model, message", [
    ({"kind": "embedding", "tensor_parallel_size": 2}, "tensor_parallel_size applies to llm models only"),
    ({"kind": "embedding", "speculative": {"draft": "x"}}, "speculative applies to llm models only"),
    ({"tensor_parallel_size": 2, "speculative": {"draft": "x"}}, "needs engine: vllm"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas must be <= autoscaling.max_replicas"),
    ({"kind": "embedding", "engine": "vllm"}, "embedding models run on the built-in encoder"),
])
def test_later_features_are_rejected_clearly(model, message):
    with pytest.raises(ValidationError, match=message):
        ClusterConfig.model_validate(_cfg(**model))


def test_duplicate_names_and_a_router_of_versioned_models_only():
    with pytest.raises(ValidationError, match="repeated: m"):
        ClusterConfig.model_validate({"models": _cfg()["models"] * 2})
    # no models of its own: every model is in version applications, named by the router's user_config
    assert ClusterConfig.model_validate({"models": []}).models == []
    with pytest.raises(ValidationError, match="models"):
        ClusterConfig.model_validate({"models": [{}]})


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name, tmp_path, monkeypatch, capsys):
    from cluster.keys import main as keys_cli
    from cluster.validate import validate_file

    monkeypatch.chdir(tmp_path)  # configs/gateway.yaml reads keys.json from the working directory
    keys_cli(["create", "--file", "keys.json", "--id", "ci"])
    capsys.readouterr()  # (the secret it printed)
    doc = yaml.safe_load((REPO / "configs" / name).read_text())
    assert any(app["import_path"] == "cluster.app:build" for app in doc["applications"])
    assert validate_file(REPO / "configs" / name)  # every application: models, sources, version tables


def test_missing_source_is_a_config_error():
    from cluster.app import ConfigError, resolve_source

    with pytest.raises(ConfigError, match="model source 'models/nope' not found"):
        resolve_source("models/nope")


def test_validate_cli_names_the_bad_field(tmp_path, capsys):
    from cluster.validate import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: x\n    import_path: cluster.app:build\n"
                   "    args: {models: [{name: m, source: models/tiny-code-llama, engine: tgi}]}\n")
    assert main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert "models.0.engine" in err and "'native' or 'vllm'" in err


def test_tensor_parallel_reserves_a_placement_group_per_replica():
    from cluster.app import _deployment_options, _engine_options

    m = ClusterConfig.model_validate(_cfg(tensor_parallel_size=2, cpus_per_worker=0.5,
                                          resources={"num_cpus": 0.25})).models[0]
    opts = _deployment_options(m)
    assert opts["placement_group_bundles"] == [{"CPU": 0.25}, {"CPU": 0.5}, {"CPU": 0.5}]
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert _engine_options(m)["tensor_parallel_size"] == 2
    gpu = ClusterConfig.model_validate(_cfg(tensor_parallel_size=2, placement_strategy="SPREAD",
                                            resources={"num_gpus": 1})).models[0]
    assert _deployment_options(gpu)["placement_group_bundles"][1] == {"GPU": 1.0, "CPU": 1.0}


def test_speculative_maps_to_each_engine(tmp_path):
    from cluster.app import _engine_options

    (tmp_path / "draft").mkdir()
    cfg = ClusterConfig.model_validate({"models": [
        {"name": "t", "source": "models/tiny-code-llama", "speculative": {"draft": "d", "num_speculative_tokens": 3}},
        {"name": "v", "source": "models/tiny-code-llama", "engine": "vllm",
         "speculative": {"draft": str(tmp_path / "draft")}},
        {"name": "d", "source": str(tmp_path / "draft")}]})
    by_name = {m.name: m for m in cfg.models}
    native = _engine_options(by_name["t"], by_name)
    assert native["draft_path"] == str(tmp_path / "draft") and native["num_speculative_tokens"] == 3
    vllm = _engine_options(by_name["v"], by_name)  # one vocabulary: the vLLM adapter builds speculative_config
    assert vllm["draft_path"] == str(tmp_path / "draft") and vllm["num_speculative_tokens"] == 4
    assert "compile_draft" not in vllm and "compile_draft" in native


def test_autoscaling_maps_to_serve_configs():
    from cluster.app import _deployment_options

    ours = ClusterConfig.model_validate(_cfg(autoscaling={"min_replicas": 0, "max_replicas": 3})).models[0]
    cfg = _deployment_options(ours)["autoscaling_config"]
    assert cfg["policy"]["policy_function"] == "cluster.autoscaling:serve_policy"
    assert cfg["min_replicas"] == 0 and cfg["max_replicas"] == 3 and "num_replicas" not in _deployment_options(ours)
    base = ClusterConfig.model_validate(_cfg(autoscaling={"policy": "serve-default", "max_replicas": 3,
                                                          "target_ongoing_requests": 3})).models[0]
    cfg = _deployment_options(base)["autoscaling_config"]
    assert "policy" not in cfg and cfg["target_ongoing_requests"] == 3


def _deployments(app) -> set[str]:
    """Names of every deployment bound into an application graph (walking the bound arguments)."""
    from ray.serve.deployment import Application

    seen, todo = set(), [app]
    while todo:
        a = todo.pop()
        node = a._bound_deployment
        seen.add(node.name)
        args = [*node.init_args, *node.init_kwargs.values()]
        for arg in args:
            todo.extend(x for x in (arg.values() if isinstance(arg, dict) else [arg]) if isinstance(x, Application))
    return seen


def test_router_mode_direct_adds_the_front_proxy(monkeypatch):
    import cluster.app
    from cluster.app import build
    from deployments.front import HAPROXY_ENV, haproxy_binary
    from deployments.front_proxy import FRONT_NAME

    direct = {**_cfg(), "router": {"mode": "direct", "direct_port": 8123}}
    if haproxy_binary() is not None:
        assert FRONT_NAME in _deployments(build(direct))
    assert FRONT_NAME not in _deployments(build(_cfg()))  # mode serve: no front
    monkeypatch.setenv(HAPROXY_ENV, "/nonexistent/haproxy")
    said: list[str] = []
    monkeypatch.setattr(cluster.app.logger, "warning", lambda msg, *a: said.append(msg % a))
    assert FRONT_NAME not in _deployments(build(direct))  # no haproxy: the router path, said once
    assert len(said) == 1 and "serving on the router path instead" in said[0]


def test_gateway_config_needs_an_existing_key_file_and_valid_policies(tmp_path, capsys):
    from cluster.app import ConfigError, gateway
    from cluster.validate import main
    from deployments.gateway import keys

    cfg = tmp_path / "g.yaml"
    cfg.write_text("applications:\n  - name: x\n    import_path: cluster.app:build\n"
                   "    args: {models: [{name: m, source: models/tiny-code-llama}], "
                   f"gateway: {{auth: {{keys_file: {tmp_path}/keys.json}}}}}}\n")
    assert main([str(cfg)]) == 1
    assert "gateway.auth.keys_file" in capsys.readouterr().err
    keys.save(tmp_path / "keys.json", keys.KeyTable([keys.new_key("a")[1]]))
    assert main([str(cfg)]) == 0
    ok = ClusterConfig.model_validate(_cfg() | {"gateway": {"auth": {"keys_file": str(tmp_path / "keys.json")},
                                                            "cors": {"allow_origins": ["https://a.example"]},
                                                            "allowed_hosts": ["a.example"]}})
    g = gateway(ok)
    assert g.auth_on and g.keys_file == str(tmp_path / "keys.json") and g.cors.allow_origins == ("https://a.example",)
    bad = ClusterConfig.model_validate(_cfg() | {"gateway": {"cors": {"allow_origins": ["not an origin"]}}})
    with pytest.raises(ConfigError, match="gateway"):
        gateway(bad)
    with pytest.raises(ValidationError, match="metrics"):
        ClusterConfig.model_validate(_cfg() | {"gateway": {"metrics": "everyone"}})
