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

Example:
    >>> log = RequestLog(RequestLogConfig(dir=tempfile.mkdtemp(), privacy="hashed"), "router-1")
    >>> log.write({"request_id": "r1", "status": 200}, prompt="hi", completion="there")
    >>> sorted(json.loads(open(log.path).read()))
    ['completion_sha256', 'prompt_sha256', 'request_id', 'status']
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

Privacy = Literal["off", "hashed", "full"]


@dataclass(frozen=True)
class RequestLogConfig:
    """Config: ``observability.request_log``."""

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
    """Writes one line per request to this process's rotating file."""

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

    @property
    def wants_content(self) -> bool:
        return self.config.privacy != "off"

    def write(self, record: dict[str, Any], prompt: str | None = None, completion: str | None = None) -> None:
        line = dict(record)
        mode = self.config.privacy
        for name, text in (("prompt", prompt), ("completion", completion)):
            if text is None or mode == "off":
                continue
            if mode == "hashed":
                line[f"{name}_sha256"] = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            else:
                line[name] = text
        entry = logging.LogRecord("modelfleet.requests", logging.INFO, __file__, 0,
                                  json.dumps(line, ensure_ascii=False, separators=(",", ":")), None, None)
        self._handler.handle(entry)  # the handler's lock makes each line whole; rotation happens here

    def close(self) -> None:
        self._handler.close()
