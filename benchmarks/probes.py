"""The hostile-client probes of issue 11, measured against the default config (``configs/default.yaml``).

Starts that config itself (a launcher subprocess with a private Ray: dashboard off, auth off, private temp
dir, a free port; stopped by process group at the end), runs each probe of the issue's "Why" and prints a
table: probe, what happened before (per the issue), what happens now (status codes, timings, counts). Process
ids come from the replica's ``pids()`` through a Serve handle in the launcher (asked by SIGUSR1); a pid is
killed only if it descends from the launcher. JSON goes to ``benchmarks/out/probes.json``, Serve's logs to
``benchmarks/out/probes-logs/``. Run from the repository root::

    .venv/bin/python benchmarks/probes.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import markdown_table, pct  # noqa: E402
from benchmarks.proctree import read_stat, stop_tree  # noqa: E402
from benchmarks.serving import free_port, wait_json, wait_ready  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
LLM, EMB, CODE = "tiny-code-llama", "all-minilm-l6-v2", "def fibonacci(n):"
BYSTANDER = {"model": LLM, "prompt": CODE, "max_tokens": 96, "temperature": 0, "ignore_eos": True, "stream": True}
SMALL = {"model": LLM, "prompt": CODE, "max_tokens": 4, "temperature": 0}
JSON = {"content-type": "application/json"}
now = time.perf_counter


# ---- launcher (a Ray driver, in its own process group) ----------------------------------------------------------
def launch(cfg_file: str) -> None:
    import ray
    import yaml
    from ray import serve

    from cluster.app import build

    cfg = json.loads(Path(cfg_file).read_text())
    app = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["applications"][0]
    stop, ask = threading.Event(), threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: ask.set())
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=cfg["ray_temp"], log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": cfg["port"]})
    args = app["args"]
    if args.get("router", {}).get("mode") == "direct":  # the client's port is the front proxy's; Serve's another
        args["router"]["direct_port"] = cfg["front_port"]
    serve.run(build(args), name=app["name"], route_prefix=app["route_prefix"])
    print("modelfleet ready", flush=True)
    while not stop.wait(0.1):
        if ask.is_set():
            ask.clear()
            try:
                got = serve.get_deployment_handle(LLM, app_name="modelfleet").pids.remote().result(timeout_s=60)
            except Exception as err:
                got = {"error": f"{type(err).__name__}: {err}"[:300]}
            Path(cfg["pids"] + ".part").write_text(json.dumps(got))
            os.replace(cfg["pids"] + ".part", cfg["pids"])
    serve.shutdown()
    ray.shutdown()


class Server:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="mfp-", dir="/tmp"))  # short: Ray's socket paths must fit
        self.port, front = free_port(), free_port()
        router = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["applications"][0]["args"]["router"]
        self.base = f"http://127.0.0.1:{front if router.get('mode') == 'direct' else self.port}"
        cfg = {"ray_temp": str(self.tmp / "ray"), "port": self.port, "front_port": front,
               "pids": str(self.tmp / "pids.json")}
        (self.tmp / "cfg.json").write_text(json.dumps(cfg))
        env = os.environ | {"TMPDIR": str(self.tmp), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                            "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
        self.log = (OUT / "probes-launcher.log").open("w")
        self.proc = subprocess.Popen([sys.executable, __file__, "--launch", str(self.tmp / "cfg.json")], cwd=ROOT,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def ready_pids(self, timeout: float = 120) -> dict[str, Any]:
        """{"replica": pid, "engine": [pids], "ready": True} of the (ready) tiny-code-llama replica."""
        deadline, got = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            (self.tmp / "pids.json").unlink(missing_ok=True)
            self.proc.send_signal(signal.SIGUSR1)
            if (got := wait_json(self.tmp / "pids.json", self.proc, timeout=90)).get("ready") and got.get("engine"):
                return got
            time.sleep(0.5)
        raise RuntimeError(f"no ready replica of {LLM}: {got}")

    def kill(self, pid: int) -> None:
        p = pid
        while p > 1 and p != self.proc.pid:  # only a process of this launcher's tree
            p = (read_stat(p) or (0,))[0]
        if p != self.proc.pid:
            raise RuntimeError(f"pid {pid} is not a descendant of the launcher {self.proc.pid}")
        os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        shutil.rmtree(OUT / "probes-logs", ignore_errors=True)
        if (logs := self.tmp / "ray" / "session_latest" / "logs" / "serve").is_dir():
            shutil.copytree(logs, OUT / "probes-logs", dirs_exist_ok=True)
        stop_tree(self.proc, str(self.tmp))
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def rss_mb(pid: int) -> str:
    with contextlib.suppress(OSError, StopIteration):
        return next(f"{int(x.split()[1]) / 1024:.0f}" for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if x.startswith("VmRSS"))
    return "?"


def alive(pid: int) -> bool:  # and not a zombie
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    return False


# ---- client helpers -------------------------------------------------------------------------------------------
async def sse(c: httpx.AsyncClient, body: dict[str, Any], r: dict | None = None, timeout: float = 300,
              rid: str | None = None) -> dict:
    """One streamed completion, filling ``r`` as it goes: status, chunk arrival stamps, text, error event, [DONE]."""
    r = {} if r is None else r
    r |= {"t0": now(), "status": None, "stamps": [], "text": "", "error": None, "done": False, "exc": None}
    try:
        async with c.stream("POST", "/v1/completions", json=body, timeout=timeout,
                            headers={"x-request-id": rid} if rid else None) as resp:
            r |= {"status": resp.status_code, "t_headers": now() - r["t0"], "retry_after": resp.headers.get(
                "retry-after")}
            if resp.status_code != 200:
                r["body"] = (await resp.aread())[:300].decode(errors="replace")
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    pass
                elif (data := line[6:]) == "[DONE]":
                    r["done"] = True
                elif "error" in (ev := json.loads(data)):
                    r["error"] = ev["error"]
                elif ev.get("choices"):
                    r["stamps"].append(now())
                    r["text"] += ev["choices"][0].get("text") or ""
    except httpx.HTTPError as err:
        r["exc"] = f"{type(err).__name__}: {err}"[:200]
    return r


async def post(c: httpx.AsyncClient, path: str, timeout: float = 120, **kw: Any) -> dict[str, Any]:
    t0 = now()
    try:
        resp = await c.post(path, timeout=timeout, **kw)
    except httpx.HTTPError as err:
        return {"status": None, "exc": f"{type(err).__name__}: {err}"[:200], "s": round(now() - t0, 3)}
    out = {"status": resp.status_code, "s": round(now() - t0, 3), "retry_after": resp.headers.get("retry-after")}
    try:
        e = resp.json().get("error")
    except ValueError:
        e, out["body"] = None, resp.text[:200]
    if e:
        out |= {"code": e.get("code"), "param": e.get("param"), "message": str(e.get("message"))[:200]}
    return out


async def streaming(c: httpx.AsyncClient, n: int, body: dict[str, Any]) -> tuple[list[dict], list[asyncio.Task]]:
    """``n`` streams, returned once each has received 2 chunks (or ended)."""
    rs: list[dict[str, Any]] = [{} for _ in range(n)]
    tasks = [asyncio.create_task(sse(c, body, r)) for r in rs]
    deadline = now() + 120
    while now() < deadline and not all(len(r.get("stamps", ())) >= 2 or t.done() for r, t in zip(rs, tasks)):  # noqa: B905
        await asyncio.sleep(0.01)
    return rs, tasks


def brief(rs: list[dict]) -> str:
    """How streams ended, e.g. "{'replica_failed+[DONE]': 3} (12-40 chunks)"."""
    kinds = count(f"{(r['error'] or {}).get('code') or 'finished'}{'+[DONE]' if r['done'] else ' NO [DONE]'}"
                  f"{' ' + r['exc'] if r['exc'] else ''}" for r in rs)
    n = [len(r["stamps"]) for r in rs]
    return f"{kinds} ({min(n)}-{max(n)} chunks)"


def max_gap_ms(rs: list[dict[str, Any]], lo: float = 0.0, hi: float = float("inf")) -> float | None:
    """Longest gap between consecutive chunks of any stream, over the gaps that overlap [lo, hi]."""
    gaps = [b - a for r in rs for a, b in zip(r["stamps"], r["stamps"][1:], strict=False) if b >= lo and a <= hi]
    return round(1000 * max(gaps), 1) if gaps else None


def gap_at(rs: list[dict[str, Any]], t0: float) -> str:
    """Where the longest gap of any stream lies, in s relative to ``t0``."""
    a, b = max(((a, b) for r in rs for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)),
               key=lambda g: g[1] - g[0], default=(t0, t0))
    return f"{a - t0:+.2f}..{b - t0:+.2f} s"


async def poll(c: httpx.AsyncClient, stop: asyncio.Event | None, t_ref: float, limit: float = 300) -> dict:
    """Small unary requests every 0.1 s until ``stop`` is set, or (stop None) until the first 200."""
    seen: list[dict] = []
    while now() - t_ref < limit and not (stop is not None and stop.is_set()):
        seen.append(await post(c, "/v1/completions", json=SMALL, timeout=60) | {"t": round(now() - t_ref, 2)})
        if stop is None and seen[-1]["status"] == 200:
            break
        await asyncio.sleep(0.1)
    bad = [p for p in seen if p["status"] != 200]
    return {"n": len(seen), "statuses": count((p["status"], p.get("code")) for p in seen),
            "first_200_s": next((p["t"] for p in seen if p["status"] == 200), None),
            "retry_after_on_503s": all(p.get("retry_after") for p in bad if p["status"] == 503),
            "slowest_s": max((p["s"] for p in seen), default=None)}


def polled(p: dict) -> str:
    return (f"first 200 {p['first_200_s']} s after the kill; the {p['n']} polls (every 0.1 s): {p['statuses']}, "
            f"Retry-After on every 503: {p['retry_after_on_503s']}, slowest poll {p['slowest_s']} s")


async def wait_healthy(c: httpx.AsyncClient, timeout: float = 300) -> float:
    t0 = now()
    while now() - t0 < timeout:
        with contextlib.suppress(httpx.HTTPError):
            if (await c.get("/health", timeout=10)).status_code == 200:
                return round(now() - t0, 1)
        await asyncio.sleep(0.5)
    raise RuntimeError("server not healthy again")


def count(xs: Any) -> dict[str, int]:
    return dict(Counter(map(str, xs)))


async def loop_lag(stop: asyncio.Event) -> int:
    """The longest this client's own event loop was late (ms): a check on what the client itself measures."""
    worst = 0.0
    while not stop.is_set():
        t = now()
        await asyncio.sleep(0.01)
        worst = max(worst, now() - t - 0.01)
    return round(1000 * worst)


def logged_ms(srv: Server, status: dict[str, Any]) -> dict[str, dict[str, list[int | None]]]:
    """Where the time went, from Serve's logs: for each client status, p50/p99 ms that the proxy, the router and
    the replica logged for those requests (``status``: x-request-id -> the status the client got)."""
    got: dict[str, dict[str, list[float]]] = {}
    for f in (srv.tmp / "ray" / "session_latest" / "logs" / "serve").glob("*.log"):
        hop = next((h for h in ("proxy", "router", LLM) if h in f.name), None)
        for m in re.finditer(r" (\S+) -- (?:POST / \d+|CALL generate_stream \w+) ([\d.]+)ms", f.read_text()):
            if hop and m[1] in status:
                got.setdefault(str(status[m[1]]), {}).setdefault(hop, []).append(float(m[2]))
    return {k: {h: [round(pct(v, 50)), round(pct(v, 99))] for h, v in hops.items()} for k, hops in got.items()}


def st(r: dict[str, Any]) -> str:
    if r.get("status") is None:
        return f"no response ({r.get('exc')})"
    err = f" {r.get('code')} param={r.get('param')}" if r["status"] >= 400 else ""
    return f"{r['status']}{err} in {r['s']:.2f} s"


# ---- probes (each returns its raw data and its line of the table) ------------------------------------------------
async def p1_numbers(c: httpx.AsyncClient, srv: Server, quiet: str) -> tuple[dict, str]:
    before = srv.ready_pids()
    rs, tasks = await streaming(c, 3, BYSTANDER)
    stop = asyncio.Event()
    poller = asyncio.create_task(poll(c, stop, now()))
    seed = await post(c, "/v1/completions", json=SMALL | {"seed": 1180591620717411303424})
    top_k = await post(c, "/v1/completions", json=SMALL | {"top_k": 2**63})
    await asyncio.gather(*tasks)
    stop.set()
    others, after = await poller, srv.ready_pids()
    same = all(r["text"] == quiet for r in rs)
    d = {"seed": seed, "top_k": top_k, "others": others, "identical": same, "engine": [before, after]}
    return d, (f"seed: {st(seed)}; top_k: {st(top_k)}; 3 bystanders {brief(rs)}, identical to a quiet run: {same}; "
               f"other requests meanwhile: {others['statuses']}; engine pid unchanged: "
               f"{before['engine'] == after['engine']}")


async def p2_big_prompt(c: httpx.AsyncClient, srv: Server, quiet: dict, prompt: str) -> tuple[dict, str]:
    body = json.dumps({"model": LLM, "prompt": prompt, "max_tokens": 4}).encode()  # encoded before the clock
    pids = srv.ready_pids()
    rss0 = f"{rss_mb(pids['replica'])}/{rss_mb(pids['engine'][0])}"
    rs, tasks = await streaming(c, 3, BYSTANDER)
    stop, health = asyncio.Event(), []

    async def watch() -> None:
        while not stop.is_set():
            try:
                health.append((await c.get("/health", timeout=10)).status_code)
            except httpx.HTTPError as err:
                health.append(type(err).__name__)
            await asyncio.sleep(0.02)

    lag_stop = asyncio.Event()
    watcher, lag, t0 = asyncio.create_task(watch()), asyncio.create_task(loop_lag(lag_stop)), now()
    async with httpx.AsyncClient(base_url=srv.base) as big:
        res = await post(big, "/v1/completions", content=body, headers=JSON)
    t1 = now()
    lag_stop.set()
    await asyncio.sleep(0.3)  # and /health just after
    stop.set()
    await asyncio.gather(watcher, *tasks)
    await asyncio.sleep(1)
    after = srv.ready_pids()
    rss1 = f"{rss_mb(after['replica'])}/{rss_mb(after['engine'][0])}"
    same = all(r["text"] == quiet["text"] for r in rs)
    d = res | {"bytes": len(body), "health": count(health), "gap_during_ms": max_gap_ms(rs, t0, t1),
               "client_lag_ms": await lag, "gap_whole_ms": max_gap_ms(rs), "quiet_gap_ms": quiet["gap"],
               "gap_at": gap_at(rs, t0), "answer_at": f"+{t1 - t0:.2f} s",
               "rss_mb": [rss0, rss1]}
    return d, (f"{len(body) / 1e6:.1f} MB body: {st(res)} ({res.get('message', '')[:70]}); 3 bystanders "
               f"{brief(rs)}, identical: {same}; their longest gap while it was in flight {d['gap_during_ms']} ms "
               f"(whole streams {d['gap_whole_ms']} ms, at {d['gap_at']} from the send, answer at {d['answer_at']}; "
               f"quiet run {quiet['gap']} ms; this client's own event loop late by at most {d['client_lag_ms']} ms "
               f"meanwhile); /health during and 0.3 s after: {d['health']}; RSS MB replica/engine {rss0} -> {rss1}")


async def p3_nested(c: httpx.AsyncClient) -> tuple[dict, str]:
    body = '{"model": "tiny-code-llama", "max_tokens": 4, "prompt": ' + "[" * 10_000 + "]" * 10_000 + "}"
    r = await post(c, "/v1/completions", content=body, headers=JSON)
    return r, f"{st(r)} ({r.get('message')})"


async def p4_embeddings(c: httpx.AsyncClient) -> tuple[dict, str]:
    texts = [f"sentence number {i} about sorting a list" for i in range(10_000)]
    quiet = await post(c, "/v1/embeddings", json={"model": EMB, "input": ["one string"]})
    too_many = await post(c, "/v1/embeddings", json={"model": EMB, "input": texts})
    big = asyncio.create_task(post(c, "/v1/embeddings", json={"model": EMB, "input": texts[:2048]}))
    await asyncio.sleep(0.5)
    one = await post(c, "/v1/embeddings", json={"model": EMB, "input": ["one string"]})
    d = {"10000": too_many, "2048": await big, "one_behind": one, "one_quiet": quiet}
    return d, (f"10,000: {st(too_many)} ({too_many.get('message')}); 2,048: {st(d['2048'])}; one string sent "
               f"0.5 s after it: {st(one)} (alone: {quiet['s']:.2f} s)")


async def p5_kill_engine(c: httpx.AsyncClient, srv: Server) -> tuple[dict, str]:
    pids = srv.ready_pids()
    rs, tasks = await streaming(c, 4, BYSTANDER | {"max_tokens": 600})
    t_kill = now()
    for p in pids["engine"]:
        srv.kill(p)
    polls = await poll(c, None, t_kill)
    await asyncio.gather(*tasks)
    after = srv.ready_pids()
    d = {"pids": [pids, after], "polls": polls, "streams": brief(rs)}
    return d, (f"killed engine {pids['engine']} with 4 streams running: {brief(rs)}; {polled(polls)}; same "
               f"replica: {after['replica'] == pids['replica']}, new engine {after['engine']}")


async def p6_kill_replica(c: httpx.AsyncClient, srv: Server) -> tuple[dict, str]:
    pids = srv.ready_pids()
    rs, tasks = await streaming(c, 3, BYSTANDER | {"max_tokens": 600})
    unary = asyncio.create_task(post(c, "/v1/completions", json=SMALL | {"max_tokens": 600, "ignore_eos": True}))
    await asyncio.sleep(0.5)
    t_kill = now()
    srv.kill(pids["replica"])
    polls = await poll(c, None, t_kill)
    await asyncio.gather(*tasks)
    u = await unary
    await asyncio.sleep(3)
    orphans = [p for p in pids["engine"] if alive(p)]
    d = {"pids": pids, "polls": polls, "streams": brief(rs), "unary": u, "engine_alive_after": orphans}
    return d, (f"killed replica {pids['replica']} with 3 streams and a unary request (600 tokens) in flight: "
               f"streams {brief(rs)}; unary: {st(u)}, Retry-After {u.get('retry_after')}; {polled(polls)}; its "
               f"engine processes still alive after: {orphans}")


async def raw_stream(port: int, body: bytes, rid: str) -> dict[str, Any]:
    """A streamed completion over a bare socket (connection: close): status, Retry-After, time to the headers and
    to the first chunk, [DONE]. Far cheaper per request than httpx: this client shares 2 cores with the server."""
    r: dict[str, Any] = {"t0": now(), "status": None, "ttft": None, "done": False, "exc": None, "body": b""}
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"x-request-id: {rid}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + body)
        got = await reader.readuntil(b"\r\n\r\n")
        r |= {"status": int(got.split(b" ", 2)[1]), "t_headers": now() - r["t0"],
              "retry_after": next((m.decode() for m in re.findall(rb"(?i)\r\nretry-after: *(\S+)", got)), None)}
        tail = b""
        while chunk := await reader.read(1 << 16):
            if r["ttft"] is None and b'"choices"' in chunk:
                r["ttft"] = now() - r["t0"]
            tail = (tail + chunk)[-4096:]
            r["body"] = r["body"] or chunk[:400]
        r["done"], r["error"] = b"[DONE]" in tail, b'"error"' in tail and r["status"] == 200
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as err:
        r["exc"] = f"{type(err).__name__}: {err}"[:200]
    finally:
        if writer is not None:
            writer.close()
    return r


async def p7_overload(c: httpx.AsyncClient, srv: Server) -> tuple[dict, str]:
    body = json.dumps(BYSTANDER | {"max_tokens": 64}).encode()
    done: list[dict] = []
    t0 = now()

    async def worker(w: int) -> None:
        while now() - t0 < 10:
            done.append(await raw_stream(srv.port, body, f"probe7cap-{w}-{len(done)}"))

    await asyncio.gather(*(worker(w) for w in range(16)))
    ok = [r for r in done if r["status"] == 200 and r["done"] and not r["error"]]
    cap = len(ok) / (now() - t0)
    ms = lambda xs, q: round(pct(xs, q)) if xs else None  # noqa: E731
    rate, rng, arrivals = 10 * cap, random.Random(0), [0.0]
    while arrivals[-1] < 20:
        arrivals.append(arrivals[-1] + rng.expovariate(rate))
    tasks, lag, t1, lag_stop = [], [], now(), asyncio.Event()
    loop = asyncio.create_task(loop_lag(lag_stop))
    for i, a in enumerate(arrivals[:-1]):
        if (delay := t1 + a - now()) > 0:
            await asyncio.sleep(delay)
        lag.append(1000 * (now() - t1 - a))
        tasks.append(asyncio.create_task(raw_stream(srv.port, body, f"probe7-{i}")))
    rs = await asyncio.gather(*tasks)
    lag_stop.set()
    server = logged_ms(srv, {f"probe7-{i}": r["status"] for i, r in enumerate(rs)})
    rej = [1000 * r["t_headers"] for r in rs if r["status"] == 503]
    adm = [1000 * r["ttft"] for r in rs if r["status"] == 200 and r["ttft"] is not None]
    d = {"capacity_req_s": cap, "rate": rate, "sent": len(rs), "statuses": count(r["status"] for r in rs),
         "stream_errors": count("error event" if r.get("error") else r["exc"] if r["exc"] else "no [DONE]"
                                for r in rs if r["status"] == 200 and not (r["done"] and not r["error"])),
         "t503_ms": [ms(rej, 50), ms(rej, 99)], "ttft_ms": [ms(adm, 50), ms(adm, 99)],
         "send_lag_ms": [ms(lag, 50), ms(lag, 99)], "client_lag_ms": await loop, "logged_ms": server,
         "retry_after": count(r.get("retry_after") for r in rs if r["status"] == 503),
         "codes": count(b",".join(re.findall(rb'"code": *"(\w+)"', r["body"])).decode() for r in rs
                        if r["status"] == 503)}
    return d, (f"capacity {cap:.2f} req/s (64 tokens, conc. 16, 10 s); then {len(rs)} streams, Poisson "
               f"{rate:.1f} req/s for 20 s (send lag p50/p99 {d['send_lag_ms']} ms): {d['statuses']}, rejected "
               f"{len(rej) / len(rs):.1%} ({d['codes']}); time to the 503 p50/p99 {d['t503_ms']} ms, Retry-After "
               f"{d['retry_after']}; admitted TTFT p50/p99 {d['ttft_ms']} ms; 200 streams not ending in [DONE] "
               f"{d['stream_errors']}; this client's event loop late by at most {d['client_lag_ms']} ms; Serve's logs "
               f"(by status: p50/p99 ms that each hop logged for the whole request) {server}")


async def p8_ignored(c: httpx.AsyncClient) -> tuple[dict, str]:
    chat = {"model": LLM, "messages": [{"role": "user", "content": "sort a list"}], "max_tokens": 4}
    fn = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    image = [{"type": "text", "text": "what is this"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    cases = {"logit_bias": ("completions", SMALL | {"logit_bias": {"50": 100}}),
             "presence_penalty": ("completions", SMALL | {"presence_penalty": 1.5}),
             "frequency_penalty": ("completions", SMALL | {"frequency_penalty": 1.5}),
             "response_format": ("chat/completions", chat | {"response_format": {"type": "json_object"}}),
             "tools+tool_choice": ("chat/completions", chat | {"tools": [fn], "tool_choice": "auto"}),
             "best_of": ("completions", SMALL | {"best_of": 3}), "suffix": ("completions", SMALL | {"suffix": "x"}),
             "image part": ("chat/completions", chat | {"messages": [{"role": "user", "content": image}]}),
             "echo+token ids": ("completions", SMALL | {"prompt": [100, 200, 300], "echo": True}),
             "echo+stream": ("completions", SMALL | {"echo": True, "stream": True})}
    d = {k: await post(c, f"/v1/{path}", json=body) for k, (path, body) in cases.items()}
    return d, "; ".join(f"{k}: {v['status']} {v.get('code')} param={v.get('param')}" for k, v in d.items())


BEFORE = {
    "1 seed 2**70, top_k 2**63": "accepted; the engine process died in its step, every request in flight failed, "
                                 "503 for ~39 s until Serve replaced the replica",
    "2a 10 MiB prompt": "every other stream of the model frozen ~21 s; /health 503; replica +1.3 GB RSS",
    "2b 3.6 MB prompt": "(no size limit: tokenised on the replica's event loop, as 2a)",
    "3 JSON nested 10,000 deep": "500 (RecursionError)",
    "4 embeddings: 10,000 inputs; 2,048 + 1": "10,000 inputs took 41 s; a one-string request behind them waited 39 s",
    "5 SIGKILL the engine process": "503 for ~27 s (three failed health checks); first success 40 s after the kill",
    "6 SIGKILL the replica": "streams cut as HTTP 200 with neither error event nor [DONE]; unary requests 500 "
                             "ActorDiedError without Retry-After",
    "7 10x overload": "503s after 7-25 s (p50 17 s); admitted requests waited ~31 s for their first token",
    "8 unimplemented parameters": "accepted and silently ignored",
}


ONLY: set[str] = set()


async def run_all(srv: Server) -> dict[str, Any]:
    res: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=srv.base, timeout=300, limits=httpx.Limits(max_connections=256)) as c:
        await post(c, "/v1/completions", json=SMALL)  # warm-up
        rs, tasks = await streaming(c, 3, BYSTANDER)
        await asyncio.gather(*tasks)
        quiet = {"text": rs[0]["text"], "gap": max_gap_ms(rs)}
        res["quiet"] = quiet
        steps = [lambda: p1_numbers(c, srv, quiet["text"]),
                 lambda: p2_big_prompt(c, srv, quiet, "x" * (10 << 20)),
                 lambda: p2_big_prompt(c, srv, quiet, "def f(): return 1\n" * 200_000),
                 lambda: p3_nested(c), lambda: p4_embeddings(c), lambda: p5_kill_engine(c, srv),
                 lambda: p6_kill_replica(c, srv), lambda: p7_overload(c, srv), lambda: p8_ignored(c)]
        for key, step in zip(BEFORE, steps, strict=True):
            if ONLY and key.split()[0] not in ONLY:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] probe {key}", flush=True)
            try:
                data, line = await step()
            except Exception as err:
                data, line = {}, f"PROBE FAILED: {type(err).__name__}: {err}"[:400]
            res[key] = {"data": data, "now": line, "healthy_again_after_s": await wait_healthy(c)}
            print(f"  {line}", flush=True)
    return res


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--launch":
        launch(sys.argv[2])
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--only":  # e.g. --only 2a,7: those probes alone
        ONLY.update(sys.argv[2].split(","))
    OUT.mkdir(parents=True, exist_ok=True)
    srv, t0, load = Server(), now(), [os.getloadavg()]
    try:
        wait_ready(srv.base, srv.proc, 600)
        print(f"configs/default.yaml up on {srv.base} after {now() - t0:.0f} s", flush=True)
        res = asyncio.run(run_all(srv))
        load.append(os.getloadavg())
    finally:
        srv.stop()
    table = markdown_table(["probe", "before (issue 11)", "now (measured)"],
                           [[k, b, res.get(k, {}).get("now", "n/a")] for k, b in BEFORE.items()])
    print(f"\n{table}\n\nload average (1/5/15 min) at start {load[0]}, at end {load[-1]} ({os.cpu_count()} CPUs; "
          "the client shares them with the server)\n")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {"commit": commit, "load": load, "results": res, "markdown": table}
    (OUT / "probes.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"raw results: {OUT / 'probes.json'}; Serve's logs: {OUT / 'probes-logs'}")


if __name__ == "__main__":
    main()
