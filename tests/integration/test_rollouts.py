"""Model versions on a live cluster, deployed as a user does (``cluster.deploy``: Serve's declarative apply):
a weighted sticky split within binomial bounds (each caller exactly where the hash puts it), live weight
changes and blue/green alias moves under steady load with zero failed requests and no replica restarted, a
shadow that never changes the primary's answer and counts its drops, automated canary analysis promoting.

Version applications run the shipped model (v1) and its draft (v2: other weights, same tokenizer)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from ray import serve

from cluster.deploy import Cluster, deploy
from cluster.registry import open_registry
from deployments.ingress.resolve import Target
from deployments.ingress.split import choose
from tests.integration.conftest import DRAFT, TARGET

ROUTER_APP, PREFIX = "rollouts", "/rollouts"
SMALL = {"dtype": "float32", "max_num_seqs": 8, "kv_cache_memory_bytes": 64 << 20}


class Fleet:
    """The module's declarative config: the router's table and the version applications, applied whole."""

    def __init__(self, registry: str, base: str) -> None:
        self.registry, self.base, self.cluster = registry, base, Cluster()
        self.table: dict = {}
        self.apps: dict[str, tuple[str, str]] = {}  # app -> (model, source)

    def doc(self) -> dict:
        router = {"name": ROUTER_APP, "route_prefix": PREFIX, "import_path": "cluster.app:build",
                  "args": {"models": [], "router": {"num_cpus": 0.1, "retry_after_s": 1},
                           "observability": {"push_interval_s": 0.5}},
                  "deployments": [{"name": "modelfleet-router", "user_config": {"models": self.table}}]}
        versions = [{"name": app, "route_prefix": None, "import_path": "cluster.app:build_version",
                     "args": {"model": {"name": model, "source": source, "engine_options": SMALL,
                                        "resources": {"num_cpus": 0.1}},
                              "registry": self.registry, "observability": {"push_interval_s": 0.5}}}
                    for app, (model, source) in self.apps.items()]
        return {"applications": [router, *versions]}

    def apply(self) -> dict[str, str]:
        return deploy(self.doc(), self.cluster, timeout_s=300, say=lambda line: print(line))

    def status(self) -> dict:
        return self.cluster.traffic(ROUTER_APP)

    def wait(self, model: str, weights: dict[str, float], timeout_s: float = 60) -> None:
        """Until the router routes ``model`` by ``weights`` with every listed version ready."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen = {v["app"]: v for v in self.status().get(model, []) if v["role"] == "live"}
            if {a: v["weight"] for a, v in seen.items()} == weights and all(v["ready"] for v in seen.values()):
                return
            time.sleep(0.3)
        raise AssertionError(f"{model} not at {weights}: {self.status()}")


@pytest.fixture(scope="module")
def fleet(router_url, tmp_path_factory):
    reg_path = str(tmp_path_factory.mktemp("registry") / "registry.db")
    reg = open_registry(reg_path)
    for model in ("tiny", "bg"):
        assert reg.register(model, TARGET)[0].version == 1
        assert reg.register(model, DRAFT)[0].version == 2
    reg.set_alias("bg", "production", 1)
    f = Fleet(reg_path, router_url + PREFIX)
    f.table = {"tiny": {"versions": {"tiny-a": 90, "tiny-b": 10}},
               "mirrored": {"versions": {"mirrored-p": 100},
                            "shadow": {"app": "mirrored-s", "fraction": 1.0, "queue_size": 2, "concurrency": 1}},
               "bg": {"versions": {"bg-prod": 100}}}
    f.apps = {"tiny-a": ("tiny", "models:/tiny/1"), "tiny-b": ("tiny", "models:/tiny/2"),
              "mirrored-p": ("mirrored", TARGET), "mirrored-s": ("mirrored", DRAFT),
              "bg-prod": ("bg", "models:/bg@production")}
    assert f.apply() == {}
    f.wait("tiny", {"tiny-a": 90, "tiny-b": 10})
    f.wait("bg", {"bg-prod-v1": 100})
    yield f
    for app in [ROUTER_APP, *serve.status().applications]:
        if app == ROUTER_APP or re.match(r"(tiny|mirrored|bg)-", app):
            serve.delete(app)


def complete(base: str, model: str, i: int, stream: bool = False, **extra) -> tuple[int, str, str]:
    """(status, the answering version, text); a stream must end in [DONE] without an error event."""
    body = {"model": model, "prompt": f"def f{i}(x):", "max_tokens": 4, "temperature": 0, "stream": stream} | extra
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
        raw = r.read().decode()
        version = r.headers.get("x-modelfleet-version", "")
    if r.status_code != 200:
        return r.status_code, version, raw
    if not stream:
        return 200, version, json.loads(raw)["choices"][0]["text"]
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    if events[-1:] != ["[DONE]"] or any('"error"' in e for e in events):
        return 599, version, raw
    return 200, version, "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])


class Load:
    """Steady traffic to one model from ``threads`` callers, unary and streamed alternately."""

    def __init__(self, base: str, model: str, threads: int = 3) -> None:
        self.base, self.model, self.results, self.stop_at = base, model, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, t: int) -> None:
        i = 0
        while not self.stop_at.is_set():
            i += 1
            try:
                self.results.append(complete(self.base, self.model, i, stream=i % 2 == 0, max_tokens=24,
                                             user=f"load-{t}-{i}"))
            except httpx.HTTPError as err:
                self.results.append((598, "", repr(err)))

    def stop(self) -> list[tuple[int, str, str]]:
        self.stop_at.set()
        for t in self.threads:
            t.join(timeout=120)
        return self.results


def metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_split_is_weighted_and_sticky_per_caller(fleet):
    users = [f"user-{i}" for i in range(400)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda u: complete(fleet.base, "tiny", 0, user=u, max_tokens=1), users))
    assert {s for s, _, _ in got} == {200}
    on_v2 = sum(v == "2" for _, v, _ in got)
    print(f"split 90/10 over 400 users: {on_v2} on v2")
    assert abs(on_v2 - 40) <= 4 * (400 * 0.1 * 0.9) ** 0.5  # within 4 sigma of the binomial
    targets = (Target("tiny", 90, "tiny-a"), Target("tiny", 10, "tiny-b"))
    expected = ["1" if choose(targets, u).app == "tiny-a" else "2" for u in users]
    assert [v for _, v, _ in got] == expected  # each caller exactly where the rendezvous hash puts it
    for u in users[:20]:  # and again: the same version for the same caller, by user or by session header
        assert complete(fleet.base, "tiny", 1, user=u, max_tokens=1)[1] == expected[users.index(u)]
    by_session = {complete_with_session(fleet.base, "s-7")[1] for _ in range(10)}
    assert len(by_session) == 1


def complete_with_session(base: str, session: str) -> tuple[int, str]:
    r = httpx.post(f"{base}/v1/completions", headers={"x-session-id": session}, timeout=60,
                   json={"model": "tiny", "prompt": "x", "max_tokens": 1})
    return r.status_code, r.headers.get("x-modelfleet-version", "")


def test_models_lists_a_versioned_model_once_with_its_versions(fleet):
    data = httpx.get(f"{fleet.base}/v1/models", timeout=30).json()["data"]
    tiny = [m for m in data if m["id"] == "tiny"]
    assert len(tiny) == 1
    assert tiny[0]["version"] == "1" and [v["version"] for v in tiny[0]["versions"]] == ["1", "2"]
    assert all(len(v["sha256"]) == 64 for v in tiny[0]["versions"])
    assert [m["id"] for m in data].count("mirrored") == 1  # a shadow is not a second entry


def _pids(apps: list[str], model: str) -> dict[str, int]:
    return {a: serve.get_deployment_handle(model, app_name=a).pids.remote().result(timeout_s=30)["replica"]
            for a in apps}


def test_live_weight_changes_under_load_fail_nothing_and_restart_nothing(fleet):
    before = _pids(["tiny-a", "tiny-b"], "tiny")
    load = Load(fleet.base, "tiny")
    time.sleep(2)
    for weights in ({"tiny-a": 50, "tiny-b": 50}, {"tiny-a": 0, "tiny-b": 100}):
        fleet.table["tiny"]["versions"] = weights
        fleet.apply()
        fleet.wait("tiny", {k: float(v) for k, v in weights.items()})
        time.sleep(2)
    results = load.stop()
    failed = [r for r in results if r[0] != 200]
    print(f"live weight change 90/10 -> 50/50 -> 0/100 under load: {len(results)} requests, {len(failed)} failed")
    assert len(results) > 20 and not failed, failed[:3]
    assert _pids(["tiny-a", "tiny-b"], "tiny") == before  # the table changed; no replica restarted
    assert {complete(fleet.base, "tiny", i, user=f"after-{i}")[1] for i in range(20)} == {"2"}
    fleet.table["tiny"]["versions"] = {"tiny-a": 90, "tiny-b": 10}
    fleet.apply()
    fleet.wait("tiny", {"tiny-a": 90.0, "tiny-b": 10.0})


def test_the_shadow_never_changes_the_answer_and_counts_its_drops(fleet):
    primary = serve.get_deployment_handle("mirrored", app_name="mirrored-p")
    for i in range(3):  # greedy: the client's text is the primary's own, as if no shadow existed
        status, _, text = complete(fleet.base, "mirrored", i, max_tokens=12)
        direct = primary.generate.remote({"prompt": f"def f{i}(x):", "params": {"max_tokens": 12,
                                                                              "temperature": 0}}).result()
        assert (status, text) == (200, direct.text)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # a burst: the shadow's queue of 2 overflows
        burst = list(pool.map(lambda i: complete(fleet.base, "mirrored", i, max_tokens=16), range(48)))
    assert {s for s, _, _ in burst} == {200}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        counts = {r: metric(fleet.base, "modelfleet_shadow_requests_total", model_name="mirrored", result=r)
                  for r in ("mirrored", "dropped", "compared", "failed")}
        if counts["compared"] + counts["failed"] >= counts["mirrored"] and counts["compared"] > 0:
            break
        time.sleep(1)
    pairs = {e: metric(fleet.base, "modelfleet_shadow_greedy_pairs_total", model_name="mirrored", exact=e)
             for e in ("true", "false")}
    print(f"shadow: {counts}, greedy pairs {pairs}")
    assert counts["dropped"] > 0 and counts["mirrored"] + counts["dropped"] == 51
    assert pairs["true"] + pairs["false"] == counts["compared"]
    assert pairs["false"] > 0  # the draft's weights differ: divergence is seen


def test_blue_green_alias_moves_fail_nothing(fleet):
    reg = open_registry(fleet.registry)
    for to, old, new in ((2, "bg-prod-v1", "bg-prod-v2"), (1, "bg-prod-v2", "bg-prod-v1")):  # the move, then back
        load = Load(fleet.base, "bg")
        time.sleep(2)
        reg.set_alias("bg", "production", to)
        assert fleet.apply() == {old: new}
        time.sleep(1)
        results = load.stop()
        failed = [r for r in results if r[0] != 200]
        versions = [v for _, v, _ in results]
        print(f"blue/green {old} -> {new}: {len(results)} requests ({versions.count('1')} on v1, "
              f"{versions.count('2')} on v2), {len(failed)} failed")
        assert len(results) > 20 and not failed, failed[:3]
        assert old not in serve.status().applications  # drained and removed
        assert {complete(fleet.base, "bg", i)[1] for i in range(5)} == {str(to)}
        assert [p.app for p in reg.pins_of("bg")] == [new]


def test_canary_analysis_promotes_a_healthy_canary(fleet):
    fleet.table["tiny"] = {"versions": {"tiny-a": 90, "tiny-b": 10},
                           "analysis": {"canary": "tiny-b", "min_requests": 8, "interval_s": 1,
                                        "steps": [10, 50, 100], "max_ttft_p95_ratio": 100}}
    fleet.apply()
    deadline, i = time.monotonic() + 120, 0
    while time.monotonic() < deadline:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda j, r=i: complete(fleet.base, "tiny", j, user=f"c-{r}-{j}", max_tokens=2),
                          range(40)))
        i += 1
        weights = {v["app"]: v["weight"] for v in fleet.status()["tiny"]}
        if weights == {"tiny-a": 0.0, "tiny-b": 100.0}:
            break
    assert weights == {"tiny-a": 0.0, "tiny-b": 100.0}
    time.sleep(1.5)
    assert metric(fleet.base, "modelfleet_canary_decisions_total", model_name="tiny", action="promote") == 1
    assert metric(fleet.base, "modelfleet_canary_decisions_total", model_name="tiny", action="step") == 1
    assert metric(fleet.base, "modelfleet_version_weight", model_name="tiny", app="tiny-b") == 100
    assert Path(fleet.registry).exists()
