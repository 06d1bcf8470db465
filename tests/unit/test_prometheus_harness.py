"""tests/prometheus_server.py against a real Prometheus: it scrapes a fixed exposition served by http.server and
the queries give back exactly what was served (colon names included), histogram_quantile included."""

from __future__ import annotations

import http.server
import math
import threading
import time
from collections.abc import Iterator

import pytest

from tests.prometheus_server import PrometheusError, PrometheusServer, ensure_prometheus

# A vLLM-style gauge and histogram (colons in the names, as vLLM's are) and a modelfleet counter.
EXPOSITION = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-code-llama"} 3.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="tiny-code-llama"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="tiny-code-llama"} 6.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="tiny-code-llama"} 10.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny-code-llama"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny-code-llama"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny-code-llama"} 3.5
# HELP modelfleet_requests Requests answered by the ingress.
# TYPE modelfleet_requests counter
modelfleet_requests_total{ingress="router",model_name="tiny-code-llama",route="/v1/completions",status="200"} 42.0
"""


class _Exposition(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = EXPOSITION.encode() if self.path == "/metrics" else b"not found\n"
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep scrapes out of the test output
        pass


@pytest.fixture(scope="module")
def prometheus() -> Iterator[tuple[PrometheusServer, str]]:
    binary = ensure_prometheus()
    if binary is None:
        pytest.skip("no prometheus binary: set MODELFLEET_PROMETHEUS, put it on PATH or `apt-get install "
                    "prometheus` (installed automatically only as root with apt-get)")
    exporter = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Exposition)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    target = f"127.0.0.1:{exporter.server_address[1]}"
    try:
        with PrometheusServer(binary, [target], metrics_path="/metrics", scrape_interval_s=1.0) as prom:
            prom.wait_for('up{job="modelfleet"} == 1', timeout_s=15)
            yield prom, target
    finally:
        exporter.shutdown()
        exporter.server_close()


def _one(result: list[dict]) -> tuple[dict[str, str], float]:
    assert len(result) == 1, result
    return result[0]["metric"], float(result[0]["value"][1])


def test_scrape_target_is_up(prometheus: tuple[PrometheusServer, str]) -> None:
    prom, target = prometheus
    (scraped,) = prom.targets()
    assert scraped["health"] == "up", scraped["lastError"]
    assert scraped["scrapeUrl"] == f"http://{target}/metrics"


def test_queried_values_equal_what_was_served(prometheus: tuple[PrometheusServer, str]) -> None:
    prom, target = prometheus
    labels, value = _one(prom.query('vllm:num_requests_running{model_name="tiny-code-llama"}'))
    assert value == 3.0
    assert labels == {"__name__": "vllm:num_requests_running", "engine": "0", "model_name": "tiny-code-llama",
                      "job": "modelfleet", "instance": target}
    _, total = _one(prom.query('modelfleet_requests_total{route="/v1/completions", status="200"}'))
    assert total == 42.0
    buckets = prom.query("vllm:time_to_first_token_seconds_bucket")
    assert {s["metric"]["le"]: float(s["value"][1]) for s in buckets} == {"0.1": 2, "0.5": 6, "1.0": 10, "+Inf": 10}
    _, mean = _one(prom.query("vllm:time_to_first_token_seconds_sum / vllm:time_to_first_token_seconds_count"))
    assert mean == pytest.approx(0.35)


def test_histogram_quantile_evaluates(prometheus: tuple[PrometheusServer, str]) -> None:
    prom, _ = prometheus
    # p50: rank 5 of 10 lies in (0.1, 0.5] holding ranks 2..6 -> 0.1 + 0.4 * (5 - 2) / (6 - 2) = 0.4
    expr = "histogram_quantile({q}, sum by (le) (vllm:time_to_first_token_seconds_bucket))"
    _, p50 = _one(prom.query(expr.format(q=0.5)))
    assert p50 == pytest.approx(0.4)
    _, p95 = _one(prom.query(expr.format(q=0.95)))  # rank 9.5 in (0.5, 1.0] holding 6..10 -> 0.5 + 0.5 * 3.5 / 4
    assert p95 == pytest.approx(0.9375)
    # over rates, as the dashboard asks: a constant histogram has no observations in the window -> NaN, no error
    # (rate needs two scrapes in its window)
    prom.wait_for("count_over_time(vllm:time_to_first_token_seconds_count[1m]) >= 2", timeout_s=10)
    _, over_rate = _one(prom.query(
        "histogram_quantile(0.5, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[1m])))"))
    assert math.isnan(over_rate)


def test_query_range_and_errors(prometheus: tuple[PrometheusServer, str]) -> None:
    prom, _ = prometheus
    now = time.time()
    (series,) = prom.query_range("vllm:num_requests_running", now - 5, now, 1)
    assert series["values"] and {float(v) for _, v in series["values"]} == {3.0}
    with pytest.raises(PrometheusError, match="bad_data"):
        prom.query("sum by (le (vllm:num_requests_running)")
