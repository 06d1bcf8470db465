"""The modelfleet Grafana dashboard, generated from code: ``python -m cluster.dashboard`` writes
``configs/grafana/modelfleet.json`` (``--check`` only compares, for CI).

The JSON is Grafana's classic dashboard model (schemaVersion 39: Grafana 10 and 11 import it as is, via
Dashboards -> New -> Import). Every panel reads the ``datasource`` template variable (type prometheus), so the
importer picks the Prometheus that scrapes the ingress's ``GET /metrics``; ``model_name`` (multi, with All)
filters every panel. Exprs use vLLM's v1 metric names and modelfleet's own (``parallel/metrics.py``
``VLLM_METRIC_NAMES``, ``deployments/metrics.py`` ``MODELFLEET_METRIC_NAMES``); the unit tests check that every
family a panel reads is one of them, and ``benchmarks/dashboard_png.py`` renders the main panels from the same
exprs, looked up by title with :func:`panel_targets`.

>>> dash = build_dashboard()
>>> dash["schemaVersion"], [v["name"] for v in dash["templating"]["list"]]
(39, ['datasource', 'model_name'])
>>> sorted(metric_families('histogram_quantile(0.9, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket[5m])))'))
['vllm:e2e_request_latency_seconds']
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["OUT_PATH", "build_dashboard", "metric_families", "panel_queries", "panel_targets", "resolve_expr"]

OUT_PATH = Path(__file__).resolve().parent.parent / "configs" / "grafana" / "modelfleet.json"
DS: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
M = 'model_name=~"$model_name"'  # the matcher every panel carries; "All" is the regex .* (allValue)
RATE = "[$__rate_interval]"
QUANTILES = (0.5, 0.95, 0.99)
WIDTH = 8  # three panels across Grafana's 24-column grid
HEIGHT = 8


# ---- expression helpers ---------------------------------------------------------------------------------------
def _rate(sample: str, by: str = "model_name", extra: str = "") -> str:
    matchers = f"{M}, {extra}" if extra else M
    return f"sum by ({by}) (rate({sample}{{{matchers}}}{RATE}))"


def _quantiles(family: str, by: str = "model_name") -> list[tuple[str, str]]:
    """p50/p95/p99 of a histogram: quantiles are only meaningful over bucket *rates* summed across replicas."""
    buckets = f"sum by (le, {by}) (rate({family}_bucket{{{M}}}{RATE}))"
    return [(f"histogram_quantile({q}, {buckets})", f"p{round(q * 100)} {{{{{by}}}}}") for q in QUANTILES]


def _ratio(num: str, den: str, by: str = "model_name") -> str:
    # clamp_min avoids a 0/0 NaN spike when a model is idle (no queries, no drafts) during the window
    return f"{_rate(num, by)} / clamp_min({_rate(den, by)}, 1e-9)"


# ---- the panels -----------------------------------------------------------------------------------------------
# (title, unit, [(expr, legend)], extra panel options); a row is ("row", title)
Target = tuple[str, str]
PanelSpec = tuple[str, str, list[Target], dict[str, Any]]


def _sections() -> list[tuple[str, list[PanelSpec]]]:
    per_replica = "model_name, replica"
    errors = _rate("modelfleet_requests_total", extra='status!~"2.."')
    return [
        ("Traffic and errors", [
            ("Request rate by status", "reqps",
             [(_rate("modelfleet_requests_total", "model_name, status"), "{{model_name}} {{status}}")], {}),
            ("Rejections by reason", "reqps",
             [(_rate("modelfleet_request_rejections_total", "model_name, reason"), "{{model_name}} {{reason}}")], {}),
            ("Error ratio (non-2xx)", "percentunit",
             [(f"{errors} / clamp_min({_rate('modelfleet_requests_total')}, 1e-9)", "{{model_name}}")], {}),
            ("Requests by route and ingress", "reqps",
             [(_rate("modelfleet_requests_total", "route, ingress"), "{{route}} ({{ingress}})")], {}),
            ("In-flight streams", "short",
             [(f"sum by (model_name) (modelfleet_in_flight_streams{{{M}}})", "{{model_name}}")], {}),
            ("Finished requests by reason", "reqps",
             [(_rate("vllm:request_success_total", "model_name, finished_reason"),
               "{{model_name}} {{finished_reason}}")], {}),
        ]),
        ("Latency", [
            ("Time to first token", "s", _quantiles("vllm:time_to_first_token_seconds"), {}),
            ("Inter-token latency", "s", _quantiles("vllm:inter_token_latency_seconds"), {}),
            ("End-to-end latency", "s", _quantiles("vllm:e2e_request_latency_seconds"), {}),
            ("Router queue time", "s", _quantiles("modelfleet_router_queue_seconds"), {}),
            ("Engine queue time", "s", _quantiles("vllm:request_queue_time_seconds"), {}),
            ("Prefill and decode time p95", "s", [
                (_quantiles("vllm:request_prefill_time_seconds")[1][0], "prefill {{model_name}}"),
                (_quantiles("vllm:request_decode_time_seconds")[1][0], "decode {{model_name}}"),
            ], {}),
        ]),
        ("Throughput and engine", [
            ("Token throughput", "short", [
                (_rate("vllm:generation_tokens_total"), "output {{model_name}}"),
                (_rate("vllm:prompt_tokens_total"), "prompt {{model_name}}"),
            ], {"axisLabel": "tokens/s"}),
            ("Running and waiting requests", "short", [
                (f"sum by (model_name) (vllm:num_requests_running{{{M}}})", "running {{model_name}}"),
                (f"sum by (model_name) (vllm:num_requests_waiting{{{M}}})", "waiting {{model_name}}"),
            ], {}),
            # vLLM v1's kv_cache_usage_perc is a fraction in [0, 1] despite its name
            ("KV cache usage", "percentunit",
             [(f"max by ({per_replica}) (vllm:kv_cache_usage_perc{{{M}}})", "{{model_name}} {{replica}}")],
             {"max": 1}),
            ("Preemptions", "ops", [(_rate("vllm:num_preemptions_total"), "{{model_name}}")], {}),
            ("Prefix cache hit rate", "percentunit",
             [(_ratio("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"), "{{model_name}}")],
             {"max": 1}),
            ("Tokens per engine step p50/p95", "short",
             _quantiles("vllm:iteration_tokens_total")[:2], {}),
        ]),
        ("Speculative decoding", [
            ("Speculative acceptance rate", "percentunit", [(_ratio(
                "vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_draft_tokens_total"),
                "{{model_name}}")], {"max": 1}),
            # a draft of k tokens yields 1 (the target's own token) + the accepted ones
            ("Mean acceptance length", "short", [(
                f"1 + {_ratio('vllm:spec_decode_num_accepted_tokens_total', 'vllm:spec_decode_num_drafts_total')}",
                "{{model_name}}")], {}),
            ("Acceptance rate by draft position", "percentunit", [(
                f"{_rate('vllm:spec_decode_num_accepted_tokens_per_pos_total', 'model_name, position')}"
                f" / on (model_name) group_left clamp_min({_rate('vllm:spec_decode_num_drafts_total')}, 1e-9)",
                "{{model_name}} pos {{position}}")], {"max": 1}),
        ]),
        ("Capacity and autoscaling", [
            ("Replicas", "short", [
                (f"sum by (model_name, state) (modelfleet_replicas{{{M}}})", "{{state}} {{model_name}}"),
                (f"sum by (model_name) (modelfleet_autoscaler_desired_replicas{{{M}}})", "desired {{model_name}}"),
            ], {"decimals": 0}),
            ("Autoscaler decisions", "short", [(
                f"sum by (model_name, direction, driver) "
                f"(increase(modelfleet_autoscaler_decisions_total{{{M}}}{RATE}))",
                "{{model_name}} {{direction}} ({{driver}})")], {"drawStyle": "bars"}),
            ("Autoscaler signals", "short", [(
                f"max by (model_name, signal) (modelfleet_autoscaler_signal{{{M}}})",
                "{{model_name}} {{signal}}")], {}),
            ("Replica starts and engine restarts", "short", [
                (f"sum by (model_name) (increase(modelfleet_replica_starts_total{{{M}}}{RATE}))",
                 "replica starts {{model_name}}"),
                (f"sum by (model_name) (increase(modelfleet_engine_restarts_total{{{M}}}{RATE}))",
                 "engine restarts {{model_name}}"),
            ], {"drawStyle": "bars"}),
        ]),
        ("GPU", [
            ("GPU utilisation", "percentunit", [(
                f"max by ({per_replica}) (modelfleet_gpu_utilization_ratio{{{M}}})",
                "{{model_name}} {{replica}}")], {"max": 1}),
            ("GPU memory used", "bytes", [(
                f"max by ({per_replica}) (modelfleet_gpu_memory_used_bytes{{{M}}})",
                "{{model_name}} {{replica}}")], {}),
        ]),
        ("Embeddings and drift", [
            ("Embedding batch size", "short", [
                *_quantiles("modelfleet_embedding_batch_size")[:2],
                (f"{_rate('modelfleet_embedding_batch_size_sum')}"
                 f" / clamp_min({_rate('modelfleet_embedding_batch_size_count')}, 1e-9)", "mean {{model_name}}"),
            ], {}),
            # the usual PSI reading: < 0.1 stable, 0.1-0.25 watch, > 0.25 shifted
            ("Drift PSI", "short", [(
                f"max by (model_name, version, feature) (modelfleet_drift_psi{{{M}}})",
                "{{model_name}} {{version}} {{feature}}")], {"thresholds": (0.1, 0.25)}),
        ]),
    ]


def _timeseries(panel_id: int, title: str, unit: str, targets: list[Target], extra: dict[str, Any],
                x: int, y: int) -> dict[str, Any]:
    custom: dict[str, Any] = {"drawStyle": extra.get("drawStyle", "line"), "lineWidth": 1, "fillOpacity": 10,
                              "showPoints": "never", "spanNulls": False, "axisLabel": extra.get("axisLabel", "")}
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if "thresholds" in extra:
        watch, alarm = extra["thresholds"]
        steps += [{"color": "orange", "value": watch}, {"color": "red", "value": alarm}]
        custom["thresholdsStyle"] = {"mode": "line"}
    defaults: dict[str, Any] = {"unit": unit, "min": 0, "custom": custom,
                                "thresholds": {"mode": "absolute", "steps": steps}}
    for key in ("max", "decimals"):
        if key in extra:
            defaults[key] = extra[key]
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "datasource": DS,
        "gridPos": {"h": HEIGHT, "w": WIDTH, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "editorMode": "code", "expr": expr,
                     "legendFormat": legend, "range": True} for i, (expr, legend) in enumerate(targets)],
    }


def _templating() -> dict[str, Any]:
    query = "label_values(vllm:num_requests_running, model_name)"
    return {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
        {"name": "model_name", "label": "Model", "type": "query", "datasource": DS, "definition": query,
         "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery", "qryType": 1},
         # refresh 2: on time-range change, so a model deployed since the page loaded shows up
         "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "hide": 0,
         "regex": "", "sort": 1, "options": []},
    ]}


def build_dashboard() -> dict[str, Any]:
    """The dashboard as plain dicts (Grafana's classic JSON model); panel ids are stable, in layout order."""
    panels: list[dict[str, Any]] = []
    y = 0
    for section, specs in _sections():
        panels.append({"id": len(panels) + 1, "type": "row", "title": section, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        y += 1
        for i, (title, unit, targets, extra) in enumerate(specs):
            x = (i % (24 // WIDTH)) * WIDTH
            if i and x == 0:
                y += HEIGHT
            panels.append(_timeseries(len(panels) + 1, title, unit, targets, extra, x, y))
        y += HEIGHT
    return {
        "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
                       {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
                       {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""}],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "description": "modelfleet serving: traffic, latency, throughput, engine, speculation, autoscaling, GPU, "
                       "embeddings and drift (generated by cluster/dashboard.py; edit the code, not this file)",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,  # shared crosshair: line a latency spike up with the queue and replicas below it
        "id": None,
        "links": [],
        "liveNow": False,
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["modelfleet", "vllm", "serving"],
        "templating": _templating(),
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "modelfleet",
        "uid": "modelfleet",
        "version": 1,
        "weekStart": "",
    }


# ---- reading the dashboard back -------------------------------------------------------------------------------
def panel_targets(dashboard: dict[str, Any], title: str) -> list[Target]:
    """``(expr, legendFormat)`` of the panel titled ``title``; ``KeyError`` when there is none."""
    for panel in dashboard["panels"]:
        if panel.get("title") == title and panel["type"] != "row":
            return [(t["expr"], t.get("legendFormat", "")) for t in panel["targets"]]
    raise KeyError(title)


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Every ``(panel title, expr)`` of the dashboard, in layout order (rows carry no queries)."""
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def resolve_expr(expr: str, rate_interval: str = "1m", model_name: str = ".*") -> str:
    """``expr`` with Grafana's variables filled in, as Grafana would send it to Prometheus."""
    return expr.replace("$__rate_interval", rate_interval).replace("$model_name", model_name)


_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_BRACED = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]")  # label matchers; range and subquery selectors
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_IDENT = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*")
# aggregation operators, binary/set operators, modifiers and literals: identifiers that are never metrics
_KEYWORDS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "atan2", "inf", "nan",
})
_SUFFIXES = ("_total", "_count", "_sum", "_bucket", "_created")


def metric_families(expr: str) -> set[str]:
    """The metric families ``expr`` reads: sample names with one exposition suffix stripped.

    Only the last suffix goes, so the histogram ``vllm:iteration_tokens_total`` (whose family name itself ends
    in ``_total``) comes back whole from ``vllm:iteration_tokens_total_bucket``. Functions (anything called),
    keywords, label names, strings, durations and Grafana variables are not metrics.

    >>> sorted(metric_families('sum by (le) (rate(a_bucket{le="1"}[5m])) / on (x) group_left b_total offset 1m'))
    ['a', 'b']
    """
    text = _STRING.sub('""', expr)
    while True:  # selectors do not nest once strings are gone, but a subquery may hold a selector
        stripped = _BRACED.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    text = _LABEL_LIST.sub(" ", text)
    families = set()
    for match in _IDENT.finditer(text):
        name = match.group()
        if name.lower() in _KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        for suffix in _SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                break
        families.add(name)
    return families


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_PATH)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from the generated JSON")
    args = parser.parse_args(argv)
    text = json.dumps(build_dashboard(), indent=2) + "\n"
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python -m cluster.dashboard", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({sum(p['type'] != 'row' for p in build_dashboard()['panels'])} panels)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
