"""A real Prometheus server for tests and benchmarks: find (or apt-install) the binary, scrape some targets, query.

The binary is Debian's ``prometheus`` package (2.42 on bookworm) or whatever ``MODELFLEET_PROMETHEUS`` names.
:func:`ensure_prometheus` installs the package when it is missing and it may (root, apt-get present); the
package's maintainer scripts would start a system service listening on :9090, so the install runs with a
``policy-rc.d`` that forbids service starts, and anything the install started anyway is stopped by pid.

:class:`PrometheusServer` runs its own process on a free loopback port with its own config and TSDB in a
temporary directory, so tests never share state with each other or with a system Prometheus.

>>> binary = ensure_prometheus()                                                   # doctest: +SKIP
>>> with PrometheusServer(binary, ["127.0.0.1:8001"], metrics_path="/metrics") as prom:  # doctest: +SKIP
...     prom.wait_for('up{job="modelfleet"} == 1', timeout_s=10)
...     prom.query("sum(vllm:num_requests_running)")
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["PrometheusError", "PrometheusServer", "ensure_prometheus", "prometheus_binary"]

logger = logging.getLogger(__name__)

DEBIAN_BINARY = "/usr/bin/prometheus"
POLICY_RC = Path("/usr/sbin/policy-rc.d")
APT_TIMEOUT_S = 600  # one apt step; the package is ~19 MB plus a few small JS libraries


class PrometheusError(RuntimeError):
    """Prometheus answered with an error (bad PromQL, a failed start, ...); the message is Prometheus's own."""


def prometheus_binary() -> str | None:
    """The Prometheus binary: ``$MODELFLEET_PROMETHEUS``, else ``prometheus`` on PATH, else Debian's path."""
    configured = os.environ.get("MODELFLEET_PROMETHEUS")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    found = shutil.which("prometheus")
    if found:
        return found
    return DEBIAN_BINARY if os.access(DEBIAN_BINARY, os.X_OK) else None


def _prometheus_pids(binary: str) -> set[int]:
    """Pids of running processes whose executable is ``binary`` (read from /proc; empty where there is none)."""
    pids = set()
    target = os.path.realpath(binary)
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if os.path.realpath(entry / "exe") == target:
                pids.add(int(entry.name))
    return pids


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S,
                          check=False)


def _install_debian_package() -> None:
    # A policy-rc.d exiting 101 is Debian's documented way to stop maintainer scripts from starting services
    # (invoke-rc.d and deb-systemd-invoke both honour it); containers usually ship one already.
    own_policy = not POLICY_RC.exists()
    if own_policy:
        POLICY_RC.write_text("#!/bin/sh\n# written by modelfleet tests/prometheus_server.py during an install\n"
                             "exit 101\n")
        POLICY_RC.chmod(0o755)
    before = _prometheus_pids(DEBIAN_BINARY)
    try:
        install = ("install", "-y", "--no-install-recommends", "prometheus")
        result = _apt_get(*install)
        if result.returncode != 0:  # usually "Unable to locate package": no package lists yet
            logger.info("apt-get install prometheus failed (%s); running apt-get update", result.stderr[-300:])
            _apt_get("update")
            result = _apt_get(*install)
        if result.returncode != 0:
            logger.warning("apt-get install prometheus failed: %s", result.stderr[-1000:])
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("apt-get install prometheus failed: %s", exc)
    finally:
        if own_policy:
            POLICY_RC.unlink(missing_ok=True)
        # whatever the install started despite the policy (a service on :9090) is ours to stop
        for pid in _prometheus_pids(DEBIAN_BINARY) - before:
            with contextlib.suppress(OSError):
                os.kill(pid, 15)


@functools.cache
def ensure_prometheus() -> str | None:
    """:func:`prometheus_binary`, installing Debian's package first when it is missing and we may (root, apt-get).

    Cached: one install attempt per process, so a machine without a package mirror fails once, not per test.
    """
    found = prometheus_binary()
    if found or os.environ.get("MODELFLEET_PROMETHEUS"):
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    started = time.monotonic()
    _install_debian_package()
    found = prometheus_binary()
    logger.info("installed prometheus in %.0f s: %s", time.monotonic() - started, found)
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusServer:
    """One Prometheus process scraping ``targets`` (``host:port``) every ``scrape_interval_s``; a context manager.

    Samples carry ``job="modelfleet"`` and ``instance=<target>``. Queries raise :class:`PrometheusError` with
    Prometheus's message on bad PromQL.

    >>> with PrometheusServer("/usr/bin/prometheus", ["127.0.0.1:9000"]) as prom:  # doctest: +SKIP
    ...     prom.wait_for("up == 1", timeout_s=10)[0]["value"][1]
    '1'
    """

    def __init__(self, binary: str, targets: list[str], metrics_path: str = "/metrics",
                 scrape_interval_s: float = 1.0, workdir: Path | None = None, job: str = "modelfleet",
                 start_timeout_s: float = 30.0) -> None:
        self.binary = binary
        self.scrape_targets = list(targets)
        self.metrics_path = metrics_path
        self.scrape_interval_s = scrape_interval_s
        self.job = job
        self.start_timeout_s = start_timeout_s
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="modelfleet-prometheus-")) if workdir is None else workdir
        self.port = 0
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(timeout=10.0)

    # ---- lifecycle ----
    def _write_config(self) -> Path:
        interval = f"{max(1, round(self.scrape_interval_s * 1000))}ms"
        targets = ", ".join(f'"{t}"' for t in self.scrape_targets)
        config = self.workdir / "prometheus.yml"
        # JSON is YAML: no yaml writer needed, and quoting stays exact
        config.write_text(
            f'global: {{scrape_interval: "{interval}", evaluation_interval: "{interval}"}}\n'
            f"scrape_configs:\n"
            f'  - {{job_name: "{self.job}", metrics_path: "{self.metrics_path}", scrape_timeout: "{interval}",\n'
            f"     static_configs: [{{targets: [{targets}]}}]}}\n")
        return config

    def start(self) -> PrometheusServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = (self.workdir / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.stop()
                raise PrometheusError(f"prometheus exited with {self._proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if self._client.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise PrometheusError(f"prometheus not ready after {self.start_timeout_s} s: {self.log_tail()}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def close(self) -> None:
        self.stop()
        self._client.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "prometheus.log").read_text(errors="replace")[-chars:]
        return ""

    # ---- the HTTP API ----
    def _api(self, path: str, params: dict[str, Any]) -> Any:
        response = self._client.get(f"{self.url}/api/v1/{path}", params=params)
        try:
            body = response.json()
        except ValueError as exc:
            raise PrometheusError(f"{path}: HTTP {response.status_code}: {response.text[:500]}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query: ``[{"metric": {...}, "value": [ts, "text"]}]`` (a scalar result comes back as one item)."""
        data = self._api("query", {"query": expr} if at is None else {"query": expr, "time": at})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Range query: ``[{"metric": {...}, "values": [[ts, "text"], ...]}]``."""
        return self._api("query_range", {"query": expr, "start": start, "end": end, "step": step})["result"]

    def wait_for(self, expr: str, timeout_s: float = 10.0, poll_s: float = 0.2) -> list[dict[str, Any]]:
        """Poll :meth:`query` until it returns something; ``TimeoutError`` (with the scrape health) otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() >= deadline:
                health = [(t.get("scrapeUrl"), t.get("health"), t.get("lastError")) for t in self.targets()]
                raise TimeoutError(f"no result for {expr!r} after {timeout_s} s; targets: {health}")
            time.sleep(poll_s)

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their ``health`` ("up"/"down"/"unknown") and ``lastError``."""
        return self._api("targets", {"state": "active"})["activeTargets"]
