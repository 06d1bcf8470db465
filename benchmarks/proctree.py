"""CPU time of a server's whole process tree, from /proc (Linux; no psutil): the benchmarks' CPU per token.

``TreeCPU(root_pid, marker)`` follows ``root_pid`` and all its descendants (parent links from
``/proc/<pid>/stat``), every process it has once seen in the tree (so a daemon re-parented to init when its
parent exits stays counted), and any process whose command line contains ``marker`` (e.g. a private temp dir
that a detached daemon was started with). ``with tree.window() as cpu:`` samples just before the body, every
``interval`` s in a background thread while it runs, and just after it; ``cpu`` is then filled in.
``stop_tree`` stops such a tree (its process group, then strays that name ``marker``).

A process (pid and start time, so a reused pid is a new process) counts the largest cumulative user + system
CPU time seen for it minus its CPU time at the window's first sample (nothing, for one started during the
window). A process that exits during the window counts up to its last sample, so at most ``interval`` s of
its CPU time is lost; one that starts and exits between two samples is not seen at all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")


def read_stat(pid: int) -> tuple[int, int, float, str] | None:
    """(ppid, start time in ticks since boot, user + system CPU s, comm) of a process; None once it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    head, _, rest = data.rpartition(b")")  # comm may hold spaces and parentheses: fields follow the last ')'
    f = rest.split()  # f[0] is field 3 (state) of proc(5)
    return int(f[1]), int(f[19]), (int(f[11]) + int(f[12])) / TICK, head.partition(b"(")[2].decode(errors="replace")


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return []


def describe(pid: int, comm: str) -> str:
    """A short label: Ray's process title (``ray::ServeReplica:...``), ``python -m module``, a script's name."""
    argv = cmdline(pid)
    if argv and argv[0].startswith("ray::"):
        return argv[0].split()[0]
    if "-m" in argv[:-1]:
        return f"{comm} -m {argv[argv.index('-m') + 1]}"
    script = next((a for a in argv[1:] if a.endswith(".py")), None)
    if script:
        return f"{comm} {Path(script).name}"
    return f"{comm} (multiprocessing child)" if "multiprocessing" in " ".join(argv) else comm


def stop_tree(proc: subprocess.Popen, marker: str) -> None:
    """SIGINT (clean shutdown), then SIGKILL of the process group we created, then any stray process of ours
    (one whose command line names ``marker``, e.g. a Ray daemon that left the group)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
        if marker in "\0".join(cmdline(pid)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def uptime_ticks() -> float:
    return float(Path("/proc/uptime").read_text().split()[0]) * TICK


@dataclass
class Proc:
    label: str
    base: float  # CPU s at the window's start (0 for a process started during the window)
    cpu: float  # the largest cumulative CPU s seen
    new: bool
    alive: bool = True


class TreeCPU:
    def __init__(self, root: int, marker: str = "", interval: float = 0.5) -> None:
        self.root, self.marker, self.interval = root, marker, interval
        self.procs: dict[tuple[int, int], Proc] = {}
        self.start_ticks = 0.0
        self.samples = 0

    def sample(self) -> None:
        stats = {int(d): s for d in os.listdir("/proc") if d.isdigit() and (s := read_stat(int(d)))}
        children: dict[int, list[int]] = defaultdict(list)
        for pid, s in stats.items():
            children[s[0]].append(pid)
        known = {pid for pid, start in self.procs if pid in stats and stats[pid][1] == start}
        todo = [self.root, *known]
        if self.marker:
            todo += [pid for pid in stats if pid not in known and self.marker in "\0".join(cmdline(pid))]
        members: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid in stats and pid not in members:
                members.add(pid)
                todo += children.get(pid, [])
        for p in self.procs.values():
            p.alive = False
        for pid in members:
            _, start, cpu, comm = stats[pid]
            if (p := self.procs.get((pid, start))) is None:
                new = start > self.start_ticks
                p = self.procs[(pid, start)] = Proc(describe(pid, comm), 0.0 if new else cpu, cpu, new)
            p.cpu, p.alive = max(p.cpu, cpu), True
        self.samples += 1

    @contextlib.contextmanager
    def window(self) -> Iterator[dict[str, Any]]:
        """Yields a dict that holds, after the block: cpu_s, wall_s, cores (cpu_s / wall_s), processes,
        started / exited (processes started or gone during the window), samples, and ``top``: CPU s by label."""
        result: dict[str, Any] = {}
        self.procs, self.samples, self.start_ticks = {}, 0, uptime_ticks()
        t0 = time.perf_counter()
        self.sample()
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.interval):
                self.sample()

        thread = threading.Thread(target=loop, name="tree-cpu", daemon=True)
        thread.start()
        try:
            yield result
        finally:
            stop.set()
            thread.join()
            self.sample()
            by_label: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
            for p in self.procs.values():
                by_label[p.label][0] += 1
                by_label[p.label][1] += p.cpu - p.base
            cpu, wall = sum(v[1] for v in by_label.values()), time.perf_counter() - t0
            result |= {"cpu_s": cpu, "wall_s": wall, "cores": cpu / wall, "processes": len(self.procs),
                       "started": sum(p.new for p in self.procs.values()),
                       "exited": sum(not p.alive for p in self.procs.values()), "samples": self.samples,
                       "top": [{"label": k, "processes": int(n), "cpu_s": round(c, 3)}
                               for k, (n, c) in sorted(by_label.items(), key=lambda kv: -kv[1][1])[:10]]}
