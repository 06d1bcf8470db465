"""Render the main panels of the Grafana dashboard from a Prometheus server's data as one PNG (no Grafana needed).

    .venv/bin/python benchmarks/dashboard_png.py --prometheus http://127.0.0.1:9090 --start -10m --end now \\
        --out benchmarks/out/dashboard.png

The exprs are the dashboard's own (``cluster/dashboard.py``, looked up by panel title), with Grafana's
variables filled in as Grafana would: ``$model_name`` -> ``--model-name`` (a regex, default all) and
``$__rate_interval`` -> max(step + scrape interval, 4 x scrape interval). So the picture of a load run shows
exactly what the dashboard will. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cluster.dashboard import build_dashboard, panel_targets, resolve_expr

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "out" / "dashboard.png"
POINTS = 300  # per series: enough for a smooth line, few enough for a quick range query


@dataclass(frozen=True)
class PanelChoice:
    """A dashboard panel to draw, optionally only the targets whose legend starts with one of ``legends``.

    >>> PanelChoice("Time to first token", ("p50", "p95")).keeps("p99 {{model_name}}")
    False
    """

    title: str
    legends: tuple[str, ...] = ()

    def keeps(self, legend: str) -> bool:
        return not self.legends or legend.startswith(self.legends)


PANELS = (
    PanelChoice("Token throughput"),
    PanelChoice("Time to first token", ("p50", "p95")),
    PanelChoice("End-to-end latency", ("p50", "p95")),
    PanelChoice("Running and waiting requests"),
    PanelChoice("KV cache usage"),
    PanelChoice("Replicas"),
)


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds from ``"1718000000"``, ``"now"`` or a relative ``"-10m"`` / ``"-90s"`` / ``"-2h"``."""
    now = time.time() if now is None else now
    if text == "now":
        return now
    relative = re.fullmatch(r"-(\d+(?:\.\d+)?)([smhd])", text)
    if relative:
        return now - float(relative.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[relative.group(2)]
    return float(text)


def rate_interval(step_s: float, scrape_interval_s: float) -> str:
    """Grafana's ``$__rate_interval``: max($__interval + scrape interval, 4 x scrape interval), in whole ms."""
    return f"{math.ceil(max(step_s + scrape_interval_s, 4 * scrape_interval_s) * 1000)}ms"


def legend_text(legend_format: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` templating over one series' labels (a missing label renders empty)."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend_format).strip()
    return text or "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def query_range(client: httpx.Client, url: str, expr: str, start: float, end: float,
                step: float) -> list[dict[str, Any]]:
    response = client.get(f"{url.rstrip('/')}/api/v1/query_range",
                          params={"query": expr, "start": start, "end": end, "step": step})
    body = response.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def collect(url: str, start: float, end: float, scrape_interval_s: float = 1.0, model_name: str = ".*",
            panels: tuple[PanelChoice, ...] = PANELS) -> list[tuple[str, str, list[tuple[str, list, list]]]]:
    """``[(title, unit, [(legend, times, values)])]`` for ``panels`` over ``[start, end]``."""
    dashboard = build_dashboard()
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in dashboard["panels"] if p["type"] != "row"}
    step = max(scrape_interval_s, (end - start) / POINTS)
    window = rate_interval(step, scrape_interval_s)
    out = []
    with httpx.Client(timeout=30.0) as client:
        for choice in panels:
            series = []
            for expr, legend in panel_targets(dashboard, choice.title):
                if not choice.keeps(legend):
                    continue
                for result in query_range(client, url, resolve_expr(expr, window, model_name), start, end, step):
                    times = [float(t) - start for t, _ in result["values"]]
                    values = [float(v) for _, v in result["values"]]
                    series.append((legend_text(legend, result["metric"]), times, values))
            out.append((choice.title, units[choice.title], series))
    return out


def render(panels: list[tuple[str, str, list[tuple[str, list, list]]]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    scale = {"percentunit": (100.0, "%"), "s": (1.0, "s"), "reqps": (1.0, "req/s"), "bytes": (2.0**-30, "GiB")}
    for ax, (panel_title, unit, series) in zip(axes.flat, panels, strict=False):
        factor, label = scale.get(unit, (1.0, "tokens/s" if "throughput" in panel_title.lower() else ""))
        for legend, times, values in series:
            ax.plot(times, [v * factor for v in values], label=legend, linewidth=1.2)
        ax.set_title(panel_title, fontsize=11)
        ax.set_xlabel("seconds since start")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)  # as the dashboard's panels (min 0): a flat line should not look like a swing
        if series and all(v == int(v) for _, _, values in series for v in values if math.isfinite(v)):
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: replicas, requests
        if series:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _glue_relative_times(argv: list[str]) -> list[str]:
    """``--start -10m`` -> ``--start=-10m``: argparse would take ``-10m`` for an option and refuse it."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--start", "--end") and arg.startswith("-"):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--start", default="-10m", help='unix seconds, or relative: "-10m", "-90s"')
    parser.add_argument("--end", default="now", help='unix seconds, "now" or relative')
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="the server's scrape interval, seconds")
    parser.add_argument("--model-name", default=".*", help="regex for the dashboard's $model_name")
    args = parser.parse_args(_glue_relative_times(sys.argv[1:] if argv is None else argv))
    now = time.time()
    start, end = parse_time(args.start, now), parse_time(args.end, now)
    if end <= start:
        parser.error(f"--end ({end}) must be after --start ({start})")
    panels = collect(args.prometheus, start, end, args.scrape_interval, args.model_name)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
    out = render(panels, args.out, f"modelfleet, {stamp} + {end - start:.0f} s ({args.prometheus})")
    empty = [title for title, _, series in panels if not series]
    print(f"wrote {out}" + (f" (no data: {', '.join(empty)})" if empty else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
