"""`serve run configs/default.yaml` itself, as a user runs it: a subprocess with its own Ray, stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.integration.conftest import free_port, wait_healthy

SERVE = str(Path(sys.executable).with_name("serve"))


def _start(config: Path, temp: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TMPDIR=temp, RAY_TMPDIR=temp)
    log = open(Path(temp) / "serve-run.log", "w")  # a file, not a pipe: nobody must drain it  # noqa: SIM115
    proc = subprocess.Popen([SERVE, "run", str(config)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen) -> str:
    """Ctrl-C, as a user would; then the process group we started, if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return Path(proc.log_path).read_text()  # type: ignore[attr-defined]


@pytest.fixture()
def temp_dir():
    return tempfile.mkdtemp(prefix="mf-sr-", dir="/tmp")


def test_serve_run_default_config(temp_dir):
    port, serve_port = free_port(), free_port()  # the front proxy's (clients) and Serve's own
    config = Path(temp_dir) / "default.yaml"
    config.write_text((REPO / "configs" / "default.yaml").read_text().replace("direct_port: 8000", f"direct_port: "
                                                                              f"{port}").replace("port: 8001",
                                                                                                 f"port: {serve_port}"))
    proc = _start(config, temp_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(base, 300, alive=lambda: proc.poll() is None):
            pytest.fail(f"serve run did not become healthy:\n{_stop(proc)[-3000:]}")
        r = httpx.post(f"{base}/v1/completions", timeout=60, json={
            "model": "tiny-code-llama", "prompt": "def fibonacci(n):", "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].strip()
        from deployments.front import haproxy_binary

        if haproxy_binary() is not None:  # the default config runs the direct path (once the front knows it)
            deadline = time.monotonic() + 60
            while r.headers.get("x-modelfleet-path") != "direct" and time.monotonic() < deadline:
                time.sleep(0.5)
                r = httpx.post(f"{base}/v1/completions", timeout=60, json={
                    "model": "tiny-code-llama", "prompt": "def f():", "max_tokens": 4})
            assert r.status_code == 200 and r.headers.get("x-modelfleet-path") == "direct", r.headers
        e = httpx.post(f"{base}/v1/embeddings", timeout=60, json={"model": "all-minilm-l6-v2", "input": "hi"})
        assert e.status_code == 200 and len(e.json()["data"][0]["embedding"]) == 384
    finally:
        _stop(proc)
    assert proc.returncode is not None


def test_serve_run_reports_an_invalid_config_with_the_field(temp_dir):
    config = Path(temp_dir) / "bad.yaml"
    config.write_text((REPO / "configs" / "default.yaml").read_text()
                      .replace("engine: native", "engine: tgi").replace("port: 8001", f"port: {free_port()}"))
    proc = _start(config, temp_dir)
    log = Path(proc.log_path)  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if "invalid modelfleet config" in log.read_text():
                time.sleep(1)  # let the rest of the message arrive
                break
            time.sleep(1)
    finally:
        text = _stop(proc)
    # Ray's CLI keeps running after a failed deploy; the message must be there, naming the field.
    assert "invalid modelfleet config" in text and "models.0.engine" in text, text[-3000:]
