"""The direct path gates like the router: a model replica's own listener (DirectApp, over real ASGI) with
API keys, per-key models, rate limits with OpenAI's headers, the Host list and CORS headers."""

from __future__ import annotations

import asyncio
import json

import httpx

from deployments.direct import DirectApp
from deployments.gateway import keys
from deployments.gateway.http_policy import CorsPolicy, HostPolicy
from deployments.gateway.keys import KeyTable, Limits
from deployments.gateway.limits_state import LocalState
from deployments.gateway.settings import GatewaySettings
from deployments.ingress.stages import Limits as BodyLimits
from deployments.messages import Chunk, GenerateRequest


async def generate(request: GenerateRequest):
    n = request.params.max_tokens
    for i in range(n):
        yield Chunk(f"t{i}", (i,), "length" if i == n - 1 else None, 3, i + 1)


def app_with(tmp_path, **limits) -> tuple[DirectApp, dict[str, str]]:
    path = tmp_path / "keys.json"
    s_all, r_all = keys.new_key("all", limits=Limits(**limits))
    s_other, r_other = keys.new_key("other", models=("another-model",))
    keys.save(path, KeyTable([r_all, r_other]))
    gateway = GatewaySettings(keys_file=str(path), cors=CorsPolicy(allow_origins=("https://ok.example",)),
                              hosts=HostPolicy(("testserver", "127.0.0.1")))
    app = DirectApp("m", generate, BodyLimits(), lambda: True, gateway=gateway)
    app.pipeline.rate_limiter.state = LocalState()  # the cluster's state, in this process
    return app, {"all": s_all, "other": s_other}


def post(app: DirectApp, headers: dict, body: dict | None = None, n: int = 1) -> list[httpx.Response]:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return [await c.post("/v1/completions", json=body or {"model": "m", "prompt": "x", "max_tokens": 2},
                                 headers=headers) for _ in range(n)]

    return asyncio.run(go())


def test_the_direct_path_refuses_without_a_key_and_with_a_foreign_model(tmp_path):
    app, secrets = app_with(tmp_path)
    r = post(app, {})[0]
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = post(app, {"authorization": f"Bearer {secrets['other']}"})[0]
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    r = post(app, {"x-api-key": secrets["all"]})[0]
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert r.headers["x-modelfleet-path"] == "direct"


def test_the_direct_path_limits_and_says_so_in_headers(tmp_path):
    app, secrets = app_with(tmp_path, rpm=3)
    rs = post(app, {"authorization": f"Bearer {secrets['all']}"}, n=5)
    assert [r.status_code for r in rs] == [200, 200, 200, 429, 429]
    assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in rs)
    assert [r.headers["x-ratelimit-remaining-requests"] for r in rs[:3]] == ["2", "1", "0"]
    assert rs[3].json()["error"]["code"] == "rate_limit_exceeded" and int(rs[3].headers["retry-after"]) >= 1


def test_the_direct_path_checks_host_and_answers_cors(tmp_path):
    app, secrets = app_with(tmp_path)
    key = {"authorization": f"Bearer {secrets['all']}"}
    bad = post(app, {**key, "host": "rebound.example"})[0]
    assert bad.status_code == 421 and json.loads(bad.text)["error"]["code"] == "invalid_host"
    ok = post(app, {**key, "origin": "https://ok.example"})[0]
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ok.example"
    foreign = post(app, {**key, "origin": "https://evil.example"})[0]
    assert foreign.status_code == 200 and "access-control-allow-origin" not in foreign.headers
