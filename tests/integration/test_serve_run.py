"""`make serve`'s launcher (``python -m cluster.launch``, `serve run` on a closed Ray) and plain `serve run`, as a
user runs them: subprocesses with their own Ray, stopped by PID."""

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


def _start(config: Path, temp: str, launcher: bool = False) -> subprocess.Popen:
    """``serve run CONFIG``; ``launcher``: ``python -m cluster.launch CONFIG`` (make serve), with Ray's token auth
    on (the token in a private HOME, so no other Ray on the machine is affected)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(HF_HUB_OFFLINE="1", TMPDIR=temp, RAY_TMPDIR=temp)
    if launcher:
        env["HOME"] = temp
        cmd = [sys.executable, "-m", "cluster.launch", str(config)]
    else:
        env["RAY_AUTH_MODE"] = "disabled"
        cmd = [SERVE, "run", str(config)]
    log = open(Path(temp) / "serve-run.log", "w")  # a file, not a pipe: nobody must drain it  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
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


def listening(proc: subprocess.Popen, temp: str) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of the session: the launcher's process
    tree and every process that runs from its temp folder (Ray's daemons and workers)."""
    import psutil

    root = psutil.Process(proc.pid)
    pids = {root.pid} | {c.pid for c in root.children(recursive=True)}
    for p in psutil.process_iter(["cmdline"]):
        if temp in " ".join(p.info["cmdline"] or []):
            pids.add(p.pid)
    out = []
    for c in psutil.net_connections("inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                out.append((psutil.Process(c.pid).name(), c.laddr.ip, c.laddr.port))
            except psutil.NoSuchProcess:
                continue
    return out


def test_make_serve_default_config_on_a_closed_ray(temp_dir):
    port, serve_port = free_port(), free_port()  # the front proxy's (clients) and Serve's own
    config = Path(temp_dir) / "default.yaml"
    config.write_text((REPO / "configs" / "default.yaml").read_text().replace("direct_port: 8000", f"direct_port: "
                                                                              f"{port}").replace("port: 8001",
                                                                                                 f"port: {serve_port}"))
    proc = _start(config, temp_dir, launcher=True)
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
        sockets = listening(proc, temp_dir)
        assert len(sockets) >= 5, sockets  # GCS, raylet, the proxies, the front, replica listeners...
        open_ = [s for s in sockets if not (s[1].startswith(("127.", "::ffff:127.")) or s[1] == "::1")]
        assert not open_, f"listening beyond loopback: {open_}"
        assert Path(temp_dir, ".ray", "auth_token").stat().st_size >= 16  # Ray's token auth was on: it made one
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


@pytest.mark.parametrize("name", ["canary.yaml", "shadow.yaml"])
def test_serve_run_of_the_rollout_configs(temp_dir, name):
    """configs/canary.yaml and configs/shadow.yaml with plain `serve run`: one model in two version
    applications; the canary answers some callers, the shadow only compares."""
    port = free_port()
    config = Path(temp_dir) / name
    config.write_text((REPO / "configs" / name).read_text().replace("port: 8000", f"port: {port}"))
    proc = _start(config, temp_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(base, 300, alive=lambda: proc.poll() is None):
            pytest.fail(f"serve run did not become healthy:\n{_stop(proc)[-3000:]}")
        models = httpx.get(f"{base}/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in models].count("tiny-code-llama") == 1
        seen: set[str] = set()
        deadline, i = time.monotonic() + 120, 0
        while time.monotonic() < deadline and len(seen) < 2:
            i += 1
            r = httpx.post(f"{base}/v1/completions", timeout=60, json={
                "model": "tiny-code-llama", "prompt": "def f():", "max_tokens": 4, "temperature": 0,
                "user": f"user-{i}"})
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-modelfleet-version"])
            if name == "shadow.yaml" and any(line.startswith("modelfleet_shadow_requests_total{")
                                             and 'result="compared"' in line
                                             for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines()):
                seen.add("compared")  # a mirrored pair was compared (the client got v1's answer alone)
        assert seen == ({"tiny-v1", "tiny-v2"} if name == "canary.yaml" else {"tiny-v1", "compared"}), seen
    finally:
        _stop(proc)
