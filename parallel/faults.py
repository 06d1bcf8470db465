"""Test-only fault injection: make one chosen request fail inside the engine's per-request step work.

The plan comes from the environment of the engine's process (``MODELFLEET_TEST_FAULT=<request id>@<n>``:
request ``<request id>`` raises once it has ``n`` output tokens, default 1), read once when the engine starts.
Nothing a client sends can set it; unset (always, outside tests), the hook is a no-op. The environment
is the carrier because it reaches a spawned engine process and a Ray worker (runtime_env) unchanged.

Example:
    >>> FaultPlan.parse("req-7@3").should_fail("req-7", 3)
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FAULT_ENV = "MODELFLEET_TEST_FAULT"


class InjectedFault(RuntimeError):
    """Raised by the hook: stands for any bug or failure met while handling one request."""


@dataclass(frozen=True)
class FaultPlan:
    """Which request fails, and after how many of its output tokens."""

    request_id: str
    after_tokens: int = 1

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        rid, _, n = text.rpartition("@") if "@" in text else (text, "", "1")
        return cls(rid, int(n))

    @classmethod
    def from_env(cls) -> FaultPlan | None:
        text = os.environ.get(FAULT_ENV)
        return cls.parse(text) if text else None

    def should_fail(self, request_id: str, num_output_tokens: int) -> bool:
        return request_id == self.request_id and num_output_tokens >= self.after_tokens

    def check(self, request_id: str, num_output_tokens: int) -> None:
        if self.should_fail(request_id, num_output_tokens):
            raise InjectedFault(f"injected fault in request {request_id!r} ({FAULT_ENV})")
