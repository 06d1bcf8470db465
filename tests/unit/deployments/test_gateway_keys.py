"""API keys: the file (hashes only), the CLI round trip, checking a secret, reloads, the auth stage."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import time

import pytest

from cluster import keys as cli
from deployments.gateway import keys
from deployments.gateway.auth import KeyAuthenticator, presented_key, visible
from deployments.gateway.keys import Grant, KeyTable, Limits, Quota
from deployments.ingress.stages import Incoming, Pipeline, body_chunks
from deployments.ingress.stages import Limits as BodyLimits
from deployments.messages import ServeError


def run_cli(*argv: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        cli.main(list(argv))
    return out.getvalue().strip(), err.getvalue()


def refused(fn, *args, **kwargs) -> ServeError:
    with pytest.raises(ServeError) as info:
        fn(*args, **kwargs)
    return info.value


def test_the_file_holds_a_salted_hash_never_the_secret(tmp_path):
    path = tmp_path / "keys.json"
    secret, _ = run_cli("create", "--file", str(path), "--id", "team-a", "--models", "tiny-*,minilm", "--rpm", "60")
    assert secret.startswith("sk-mf-team-a.") and len(secret) > 50
    text = path.read_text()
    assert secret not in text and secret.split(".", 1)[1] not in text
    rec = json.loads(text)["keys"][0]
    assert rec["hash"] == keys.digest(rec["salt"], secret) and len(rec["salt"]) == 32
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    # the same secret under another salt hashes differently (no equal hashes between files)
    assert keys.digest("00" * 16, secret) != rec["hash"]


def test_cli_round_trip_create_list_update_rotate_revoke(tmp_path):
    path = str(tmp_path / "keys.json")
    a, _ = run_cli("create", "--file", path, "--id", "a", "--tpm", "1000", "--quota", "5000", "--period", "day")
    b, _ = run_cli("create", "--file", path, "--id", "b", "--expires-in", "1h")
    with pytest.raises(SystemExit):
        run_cli("create", "--file", path, "--id", "a")  # ids are unique
    table = keys.load(path)
    assert table.check(a).limits == Limits(tpm=1000) and table.check(a).quota == Quota(5000, "day")
    assert table.check(b).models == ("*",)
    run_cli("update", "--file", path, "--id", "a", "--rpm", "7", "--models", "x", "--model-limit", "x:rpm=2")
    g = keys.load(path).check(a)
    assert g.limits == Limits(rpm=7, tpm=1000) and g.models == ("x",) and g.limits_for("x") == Limits(rpm=2)
    listing, _ = run_cli("list", "--file", path)
    assert "a " in listing and "active" in listing and a not in listing
    a2, _ = run_cli("rotate", "--file", path, "--id", "a", "--grace", "1h")
    table = keys.load(path)
    assert table.check(a2).key_id == "a" and table.check(a).key_id == "a"  # the old one within its grace
    a3, _ = run_cli("rotate", "--file", path, "--id", "a")
    table = keys.load(path)
    assert table.check(a3).key_id == "a"
    for old in (a, a2):
        assert refused(table.check, old).info.status == 401
    run_cli("revoke", "--file", path, "--id", "b")
    err = refused(keys.load(path).check, b)
    assert err.info.code == "invalid_api_key" and "revoked" in err.info.message and err.key_id == "b"
    assert "revoked" in run_cli("list", "--file", path)[0]


def test_check_refuses_unknown_wrong_expired_with_invalid_api_key():
    secret, rec = keys.new_key("k", expires_at=1000.0, now=0.0)
    table = KeyTable([rec])
    assert table.check(secret, now=999.0).key_id == "k"
    expired = refused(table.check, secret, now=1000.0)
    assert expired.info.status == 401 and "expired" in expired.info.message and expired.key_id == "k"
    for bad in ("", "sk-mf-", "sk-mf-k", "sk-mf-k.", "sk-mf-other.abc", secret + "x", "Bearer " + secret,
                secret.replace("sk-mf-k.", "sk-mf-k2.")):
        err = refused(table.check, bad, now=1.0)
        assert err.info.status == 401 and err.info.code == "invalid_api_key" and not hasattr(err, "key_id")
        assert len(bad) < 12 or bad not in err.info.message  # the refusal never echoes the secret


def test_globs_and_per_model_limits():
    g = Grant("k", ("tiny-*", "minilm"), Limits(), (("tiny-code-*", Limits(rpm=3)),))
    assert g.may_use("tiny-code-llama") and g.may_use("minilm") and not g.may_use("minilm2")
    assert not g.may_use("TINY-x")  # case-sensitive, as model names are
    assert g.limits_for("tiny-code-llama") == Limits(rpm=3) and g.limits_for("tiny-x") is None
    assert g.limited and not Grant("k", ("*",), Limits()).limited
    assert visible(g, ["tiny-a", "minilm", "vllm"]) == ["tiny-a", "minilm"]
    assert visible(None, ["tiny-a", "vllm"]) == ["tiny-a", "vllm"]


def test_malformed_records_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="key id"):
        keys.KeyRecord("bad id!", "00", "00")
    with pytest.raises(ValueError, match="rpm"):
        Limits(rpm=0)
    with pytest.raises(ValueError, match="period"):
        Quota(10, "fortnight")
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"version": 1, "keys": [{"id": "a", "salt": "00", "hash": "00", "colour": "red"}]}))
    with pytest.raises(ValueError, match="unknown fields"):
        keys.load(path)


def test_presented_key_from_bearer_or_x_api_key():
    assert presented_key({"authorization": "Bearer sk-1"}) == "sk-1"
    assert presented_key({"authorization": "bearer  sk-1 "}) == "sk-1"
    assert presented_key({"x-api-key": "sk-2"}) == "sk-2"
    assert presented_key({"authorization": "Basic abc"}) is None
    assert presented_key({}) is None


def test_authenticator_reloads_a_changed_file_and_keeps_the_old_table_on_a_broken_one(tmp_path):
    path = tmp_path / "keys.json"
    s1, r1 = keys.new_key("one")
    keys.save(path, KeyTable([r1]))
    auth = KeyAuthenticator(str(path), reload_s=0.0)

    def call(headers: dict, route: str = "/v1/models"):
        return asyncio.run(auth.authenticate("r", headers, route))

    assert call({"authorization": f"Bearer {s1}"}).key_id == "one"
    assert call({}, "/health") is None  # public
    with pytest.raises(ServeError) as missing:
        call({})
    assert missing.value.info.status == 401 and dict(missing.value.info.extra_headers)["WWW-Authenticate"] == "Bearer"
    s2, r2 = keys.new_key("two")
    keys.save(path, KeyTable([r2]))  # "one" removed, "two" added: both effective at once
    assert call({"x-api-key": s2}).key_id == "two"
    with pytest.raises(ServeError):
        call({"x-api-key": s1})
    path.write_text("{not json")
    assert call({"x-api-key": s2}).key_id == "two"  # a broken file does not open or close the gate
    assert auth.reloads == 2


def test_authenticator_checks_the_file_at_most_every_reload_s(tmp_path):
    path = tmp_path / "keys.json"
    keys.save(path, KeyTable())
    auth = KeyAuthenticator(str(path), reload_s=3600)
    s, r = keys.new_key("late")
    keys.save(path, KeyTable([r]))
    with pytest.raises(ServeError):
        asyncio.run(auth.authenticate("r", {"x-api-key": s}, "/v1/models"))  # not looked at yet
    auth._checked = time.monotonic() - 3601
    assert asyncio.run(auth.authenticate("r", {"x-api-key": s}, "/v1/models")).key_id == "late"


def test_pipeline_refuses_a_model_the_key_may_not_use_with_403(tmp_path):
    path = tmp_path / "keys.json"
    s, r = keys.new_key("k", models=("tiny-*",))
    keys.save(path, KeyTable([r]))
    pipe = Pipeline(BodyLimits(), KeyAuthenticator(str(path)))

    def admit(model: str, key: str = s):
        body = json.dumps({"model": model, "prompt": "x"}).encode()
        return asyncio.run(pipe.admit(Incoming("POST", "/v1/completions", {
            "content-type": "application/json", "authorization": f"Bearer {key}"}, body_chunks([body]))))

    assert admit("tiny-code-llama").principal.key_id == "k"
    err = refused(admit, "vllm")
    assert (err.info.status, err.info.code, err.info.param, err.key_id) == (403, "model_not_allowed", "model", "k")
    assert refused(admit, "tiny-code-llama", "sk-mf-k.wrong").info.status == 401


def test_the_gateway_modules_examples_run():
    import doctest

    from cluster import keys as keys_cli
    from deployments import metrics_listener
    from deployments.gateway import auth, http_policy, limits_state, ratelimit, settings, token_bucket

    for module in (keys, auth, http_policy, limits_state, ratelimit, settings, token_bucket, keys_cli,
                   metrics_listener):
        assert doctest.testmod(module).failed == 0, module.__name__
