"""cluster/dashboard.py: the committed JSON is the generated one, every query reads metrics we export (by the
exporters' own name lists), the PromQL is well-formed (shape checks here, a real Prometheus parse where one is
available), and the JSON is a well-formed Grafana dashboard (datasources, ids, layout)."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.dashboard_png import PANELS
from cluster.dashboard import (
    OUT_PATH,
    build_dashboard,
    main,
    metric_families,
    panel_queries,
    panel_targets,
    resolve_expr,
)
from deployments.metrics import MODELFLEET_METRIC_NAMES
from parallel.metrics import VLLM_METRIC_NAMES

DS = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return build_dashboard()


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


# ---- the committed file ---------------------------------------------------------------------------------------
def test_committed_json_equals_build_dashboard(dashboard: dict) -> None:
    assert OUT_PATH.exists(), "configs/grafana/modelfleet.json is missing: run python -m cluster.dashboard"
    assert json.loads(OUT_PATH.read_text()) == dashboard, "stale: run python -m cluster.dashboard"
    assert main(["--check"]) == 0  # byte for byte too, so a regenerate never shows a spurious diff


def test_check_mode_spots_a_stale_file(tmp_path) -> None:
    out = tmp_path / "dash.json"
    assert main(["--check", "--out", str(out)]) == 1  # missing
    assert main(["--out", str(out)]) == 0
    assert main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace('"modelfleet"', '"edited"', 1))
    assert main(["--check", "--out", str(out)]) == 1


# ---- what the queries read ------------------------------------------------------------------------------------
def test_every_queried_family_is_exported(dashboard: dict) -> None:
    known = VLLM_METRIC_NAMES | MODELFLEET_METRIC_NAMES
    queries = panel_queries(dashboard)
    assert queries
    unknown = {(title, family) for title, expr in queries for family in metric_families(expr) - known}
    assert not unknown, f"panels read metrics nobody exports: {sorted(unknown)}"
    assert all(metric_families(expr) for _, expr in queries), "a query that reads no metric"


def test_the_serving_panels_are_there(dashboard: dict) -> None:
    read = set().union(*(metric_families(expr) for _, expr in panel_queries(dashboard)))
    for family in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                   "vllm:e2e_request_latency_seconds", "vllm:generation_tokens", "vllm:prompt_tokens",
                   "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "vllm:num_preemptions", "vllm:prefix_cache_hits", "vllm:spec_decode_num_accepted_tokens",
                   "vllm:spec_decode_num_drafts", "modelfleet_requests", "modelfleet_request_rejections",
                   "modelfleet_replicas", "modelfleet_autoscaler_desired_replicas", "modelfleet_autoscaler_decisions",
                   "modelfleet_router_queue_seconds", "modelfleet_in_flight_streams",
                   "modelfleet_gpu_utilization_ratio", "modelfleet_gpu_memory_used_bytes",
                   "modelfleet_embedding_batch_size", "modelfleet_drift_psi"):
        assert family in read, family
    # the PNG renderer looks panels up by title: each one it draws must exist and keep at least one target
    for choice in PANELS:
        assert any(choice.keeps(legend) for _, legend in panel_targets(dashboard, choice.title)), choice


def test_queries_have_the_right_shape(dashboard: dict) -> None:
    for title, expr in panel_queries(dashboard):
        assert 'model_name=~"$model_name"' in expr, (title, expr)  # every panel follows the model picker
        # counters and histograms only make sense as rates of their exposed samples, never of a bare gauge
        for sample in re.findall(r"\b(?:rate|increase)\(\s*([\w:]+)", expr):
            assert sample.endswith(("_total", "_bucket", "_sum", "_count")), (title, sample)
        if "histogram_quantile" in expr:
            assert re.search(r"sum by \(le\b[^)]*\) \(rate\([\w:]+_bucket\{", expr), (title, expr)
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), (title, expr)


def test_spec_decode_formulas(dashboard: dict) -> None:
    # acceptance rate = accepted / draft tokens; mean acceptance length = 1 + accepted / drafts
    ((rate, _),) = panel_targets(dashboard, "Speculative acceptance rate")
    assert rate.index("spec_decode_num_accepted_tokens_total") < rate.index("/ clamp_min(")
    assert "spec_decode_num_draft_tokens_total" in rate.split("/ clamp_min(")[1]
    ((length, _),) = panel_targets(dashboard, "Mean acceptance length")
    assert length.startswith("1 + ") and "spec_decode_num_drafts_total" in length.split("/ clamp_min(")[1]


@pytest.mark.parametrize(("expr", "families"), [
    ("vllm:num_requests_running", {"vllm:num_requests_running"}),
    ("rate(vllm:prompt_tokens_total[5m])", {"vllm:prompt_tokens"}),
    ("histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[$__rate_interval])))",
     {"vllm:time_to_first_token_seconds"}),
    # a histogram whose family name itself ends in _total: only the last suffix goes
    ("sum(rate(vllm:iteration_tokens_total_bucket[1m]))", {"vllm:iteration_tokens_total"}),
    ("rate(x_sum[1m]) / rate(x_count[1m]) + y_created", {"x", "y"}),
    # label names in matchers and grouping clauses, strings, numbers, keywords and functions are not metrics
    ('sum by (model_name, le) (x_bucket{model_name=~"$model_name", le="0.5", q="rate(z_total)"})', {"x"}),
    ("a_total / on (model_name) group_left (replica) b_total", {"a", "b"}),
    ("sum without (instance) (node_memory_bytes) > bool 3 and y unless z or w offset 5m", {
        "node_memory_bytes", "y", "z", "w"}),
    ("clamp_min(sum(rate(foo_total[1m])), 1e-9) > Inf", {"foo"}),
    ("max_over_time(up[5m:1m]) * on () group_right vector(1)", {"up"}),
    ("time() - process_start_time_seconds", {"process_start_time_seconds"}),
    ("topk(3, sum by (model_name) (count_values(\"v\", vllm:num_requests_waiting)))", {"vllm:num_requests_waiting"}),
    ("1 + 2 * scalar(vector(3))", set()),
])
def test_metric_families(expr: str, families: set[str]) -> None:
    assert metric_families(expr) == families


def test_resolve_expr() -> None:
    assert resolve_expr('rate(a_total{m=~"$model_name"}[$__rate_interval])', "2m", "x|y") == \
        'rate(a_total{m=~"x|y"}[2m])'


# ---- Grafana's JSON model -------------------------------------------------------------------------------------
def test_every_panel_has_a_datasource_and_a_unique_id(dashboard: dict) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    panels = _panels(dashboard)
    assert len(panels) >= 25
    for panel in panels:
        assert panel["datasource"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == DS for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "titles are how the PNG renderer finds panels"


def test_panels_tile_the_grid_without_overlap(dashboard: dict) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_templating_and_header(dashboard: dict) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41  # Grafana 10.0 .. 11.x classic model
    assert dashboard["uid"] and dashboard["title"] and dashboard["id"] is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model = variables["model_name"]
    assert model["type"] == "query" and model["datasource"] == DS
    assert model["query"]["query"] == model["definition"] == "label_values(vllm:num_requests_running, model_name)"
    assert model["includeAll"] and model["allValue"] == ".*"  # the panels' =~ needs a regex for "All"


def test_every_query_parses_in_a_real_prometheus(dashboard: dict) -> None:
    from tests.prometheus_server import PrometheusError, PrometheusServer, ensure_prometheus

    binary = ensure_prometheus()
    if binary is None:
        pytest.skip("no prometheus binary (set MODELFLEET_PROMETHEUS or apt-get install prometheus)")
    errors = []
    with PrometheusServer(binary, []) as prom:
        for title, expr in panel_queries(dashboard):
            try:
                prom.query(resolve_expr(expr, "1m"))
            except PrometheusError as exc:  # bad_data: the expression does not parse
                errors.append((title, str(exc)))
        with pytest.raises(PrometheusError, match="bad_data"):  # and the check does catch one
            prom.query(resolve_expr(panel_queries(dashboard)[0][1], "1m") + ")")
    assert not errors, errors
