"""The request log: one JSON line per request, written by the process that answered it.

Fields: ``ts`` (end, unix s), ``request_id``, ``model``, ``version``, ``route``, ``ingress``, ``status``,
``code`` (the OpenAI error code, when it failed), ``stream``, ``prompt_tokens``, ``completion_tokens``,
``queue_s`` (the engine's queue), ``ttft_s``, ``e2e_s``, ``finish_reason``, ``key_id`` (once keys exist:
the key's id, never the key). Content follows the privacy mode:

    off     (default) no prompt or completion content at all
    hashed  ``prompt_sha256`` / ``completion_sha256``: equal content is recognisable, not readable
    full    ``prompt`` / ``completion`` as text

Files: ``<dir>/requests-<process>.jsonl``, one per process (several processes never share a file, so a
rotation cannot tear another's line), rotated at ``max_bytes`` with ``backups`` old files kept: a bounded
disk footprint whatever the traffic. ``dir`` defaults to ``modelfleet/`` in the Ray session's log folder.
Lines are encoded, hashed and written by a thread of their own: a slow disk never stalls the event loop
that serves streams (the queue is bounded; past it lines are dropped and counted, never waited for).
``hashed`` is a pseudonym, not encryption: a prompt someone can guess can be confirmed by hashing it.

Example:
    >>> log = RequestLog(RequestLogConfig(dir=tempfile.mkdtemp(), privacy="hashed"), "router-1")
    >>> log.write({"request_id": "r1", "status": 200}, prompt="hi", completion="there"); log.close()
    >>> sorted(json.loads(open(log.path).read()))
    ['completion_sha256', 'prompt_sha256', 'request_id', 'status']
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import os
import queue
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Literal

Privacy = Literal["off", "hashed", "full"]


@dataclass(frozen=True)
class RequestLogConfig:
    """Config: ``observability.request_log``.

    Example:
        >>> RequestLogConfig(privacy="hashed").max_bytes
        67108864
    """

    enabled: bool = True
    dir: str | None = None  # None: <Ray session log dir>/modelfleet
    privacy: Privacy = "off"
    max_bytes: int = 64 << 20
    backups: int = 3


def default_dir() -> str:
    try:
        import ray

        node = ray._private.worker.global_worker.node  # the Ray session this process belongs to
        return os.path.join(node.get_logs_dir_path(), "modelfleet")
    except Exception:  # not in a Ray worker (unit tests, tools)
        return os.path.join(tempfile.gettempdir(), "modelfleet-logs")


class RequestLog:
    """Writes one line per request to this process's rotating file (from a writer thread)."""

    MAX_QUEUED = 10_000

    def __init__(self, config: RequestLogConfig, process: str) -> None:
        self.config = config
        folder = config.dir or default_dir()
        os.makedirs(folder, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in process)[:128]
        self.path = os.path.join(folder, f"requests-{safe}.jsonl")
        self._handler = logging.handlers.RotatingFileHandler(self.path, maxBytes=config.max_bytes,
                                                             backupCount=config.backups, encoding="utf-8",
                                                             delay=True)
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.Queue[tuple[dict[str, Any], Any, str | None] | None] = queue.Queue(
            self.MAX_QUEUED)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    @property
    def wants_content(self) -> bool:
        return self.config.privacy != "off"

    def write(self, record: dict[str, Any], prompt: Any = None, completion: str | None = None) -> None:
        """Queue one line (never blocks: a full queue drops it and counts the drop)."""
        if self.config.privacy == "off":
            prompt = completion = None
        try:
            self._queue.put_nowait((record, prompt, completion))
        except queue.Full:
            self.dropped += 1

    def _line(self, record: dict[str, Any], prompt: Any, completion: str | None) -> str:
        line = dict(record)
        for name, content in (("prompt", prompt), ("completion", completion)):
            if content is None:
                continue
            text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False,
                                                                        separators=(",", ":"))
            if self.config.privacy == "hashed":
                line[f"{name}_sha256"] = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            else:
                line[name] = text
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                entry = logging.LogRecord("modelfleet.requests", logging.INFO, __file__, 0, self._line(*item), None,
                                          None)
                self._handler.handle(entry)  # rotation happens here, in this thread
            except Exception:  # a full disk: this line is lost, the next may go through
                self.dropped += 1

    def close(self) -> None:
        """Write what is queued, then close the file."""
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._handler.close()
