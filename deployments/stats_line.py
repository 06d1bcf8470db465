"""The periodic stats line of a busy native replica, in the shape of vLLM's ``LoggingStatLogger`` (so people
who read vLLM's logs read ours): throughput since the previous line, the batch, KV usage, prefix hit rate,
and for speculative decoding the acceptance. The vLLM engine logs its own line; a pure function here.

Example:
    >>> a = EngineStats(0, 0, 0, 64, 0.0, 0.0, 0.0, 0)
    >>> b = EngineStats(1, 3, 16, 64, 0.25, 0.5, 0.0, 0, prompt_computed_tokens=200, generated_tokens=100,
    ...                 prefix_queried_tokens=400, prefix_hit_tokens=200)
    >>> stats_line("m", a, b, 10.0).split(", ")[:3]
    ['m: Avg prompt throughput: 20.0 tokens/s', 'Avg generation throughput: 10.0 tokens/s', 'Running: 3 reqs']
"""

from __future__ import annotations

from parallel.engine_stats import EngineStats

__all__ = ["EngineStats", "stats_line"]


def stats_line(model: str, prev: EngineStats, cur: EngineStats, dt: float) -> str | None:
    """The line for the interval ``prev`` -> ``cur`` (``dt`` seconds), or None when the replica was idle
    throughout (vLLM, too, stays quiet when nothing happened). A restarted engine's counts start again from
    0: then the interval counts from 0."""
    def delta(name: str) -> int:
        now, before = getattr(cur, name), getattr(prev, name)
        return now - before if now >= before else now

    prompt, generated = delta("prompt_computed_tokens"), delta("generated_tokens")
    if not (prompt or generated or cur.num_running or cur.num_waiting):
        return None
    dt = max(dt, 1e-9)
    queried, hits = delta("prefix_queried_tokens"), delta("prefix_hit_tokens")
    line = (f"{model}: Avg prompt throughput: {prompt / dt:.1f} tokens/s, Avg generation throughput: "
            f"{generated / dt:.1f} tokens/s, Running: {cur.num_running} reqs, Waiting: {cur.num_waiting} reqs, "
            f"KV cache usage: {100 * cur.kv_usage:.1f}%, Prefix cache hit rate: "
            f"{100 * hits / queried if queried else 0.0:.1f}%")
    drafts, drafted = delta("spec_num_drafts"), delta("spec_num_draft_tokens")
    accepted = delta("spec_num_accepted_tokens")
    if drafts:
        line += (f"; SpecDecoding: Mean acceptance length: {1 + accepted / drafts:.2f}, Accepted: {accepted} tokens, "
                 f"Drafted: {drafted} tokens, Avg draft acceptance rate: {100 * accepted / max(drafted, 1):.1f}%")
    return line
