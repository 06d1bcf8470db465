"""The engine's published snapshot: what routers, autoscalers and the replica's /stats read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for routers and autoscalers (immutable: published by one thread, read by others).

    Example:
        >>> EngineStats(0, 0, 0, 64, 0.0, 0.0, 0.0, 0).kv_blocks_total
        64
    """

    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_usage: float
    prefix_hit_rate: float
    tokens_per_s: float  # generated tokens per second over the last ``window_s``
    num_preemptions: int
    num_aborted: int = 0  # requests stopped before finishing (client disconnects, explicit aborts)
    num_failed: int = 0  # requests that failed inside the engine (each alone; the engine went on)
    spec_acceptance_rate: float = 0.0  # accepted / proposed draft tokens
    spec_mean_tokens_per_step: float = 0.0  # tokens emitted per verification step (accepted + 1)
    draft_calls: int = 0  # remote draft (speculative placement "separate"): proposal calls so far
    draft_call_ms: float = 0.0  # ... and their mean duration
    window_s: float = 10.0
    # Cumulative counts since the engine started (Prometheus counters: they only grow; a restarted engine
    # process starts again from 0, which Prometheus reads as a counter reset).
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    prompt_computed_tokens: int = 0  # prompt tokens run through the model (prefill chunks, recomputation)
    generated_tokens: int = 0
    spec_num_drafts: int = 0  # verification steps of a request with proposals (vLLM's num_drafts)
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()  # accepted tokens by draft position 0..k-1
