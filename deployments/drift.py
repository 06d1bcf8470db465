"""Drift gauges: per model and version, the population stability index (PSI) of prompt length, output
length and finish reason over a recent window against a baseline window. Pure (no Ray, no
prometheus), unit-tested alone; the aggregator exports ``DriftTracker.gauges`` (e.g. as a gauge
``modelfleet:drift_psi{model_name, version, feature}``).

The index (Siddiqi, "Credit Risk Scorecards", Wiley 2006, ch. 12, the "system stability report";
Yurdakul, "Statistical Properties of Population Stability Index", PhD thesis, Western Michigan
University 2018), over B bins with e_i the baseline ("expected") and a_i the recent ("actual")
proportion of bin i:

    PSI = Σ_{i=1..B} (a_i − e_i) · ln(a_i / e_i)

It is the symmetrised Kullback-Leibler divergence KL(a‖e) + KL(e‖a), so every term is ≥ 0 and PSI is 0
only for equal proportions. Conventional reading (Siddiqi): < 0.1 no shift, 0.1-0.25 moderate,
> 0.25 significant. Under no shift, with M baseline and N recent requests drawn independently,
PSI / (1/M + 1/N) is approximately χ² with B − 1 degrees of freedom (Yurdakul 2018), so its noise
floor is about (B − 1)(1/M + 1/N) over the B bins actually occupied: with the defaults (M = 500,
N ≥ 100) and ~6 occupied length bins, ≈ 0.06. That is why ``min_recent`` is 100 and not 10, and why a
request counts in the baseline or in the recent window, never both (the two samples stay independent).

Empty bins: a proportion of 0 makes ln(a/e) infinite, so proportions are floored at ``epsilon`` =
1e-4 (not renormalised: each term stays ≥ 0 either way). 1e-4 is below 1/``baseline_size`` and
1/any sensible window, so the floor only ever touches truly empty bins; a bin that holds p of one
window and nothing of the other then adds (p − 1e-4)·ln(p/1e-4) ≈ 9.2·p: finite, and large when p is.

Bins are fixed, so they agree across windows and processes: token lengths in log2 bins {0}, {1},
[2, 3], [4, 7], ..., [2^16, 2^17 − 1], [2^17, ∞) (``LENGTH_BINS`` = 19); finish reasons over
``FINISH_REASONS`` (None and unknown reasons are "other").

Example:
    >>> t = DriftTracker(baseline_size=2, min_recent=2)
    >>> for now, p in [(0.0, 10), (0.0, 12), (5.0, 1000), (5.0, 1500)]:
    ...     t.observe("m", "v1", p, 50, "stop", now)
    >>> g = t.gauges(now=5.0)
    >>> g[("m", "v1", "prompt_tokens")] > 0.25, round(g[("m", "v1", "output_tokens")], 6)
    (True, 0.0)
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

LENGTH_CAP_BITS = 17  # lengths ≥ 2^17 tokens share the last bin
LENGTH_BINS = LENGTH_CAP_BITS + 2  # {0}, then [2^(k−1), 2^k − 1] for k = 1..17, then [2^17, ∞)
FINISH_REASONS = ("stop", "length", "abort", "error", "other")
FEATURES = ("prompt_tokens", "output_tokens", "finish_reason")
PSI_EPSILON = 1e-4
MAX_NAME_CHARS = 256  # a longer model or version name is not tracked (counted in ``dropped``)

# Internally one request's bins live in a flat list: prompt bins, then output bins, then finish bins.
_O = LENGTH_BINS
_F = 2 * LENGTH_BINS
_WIDTH = _F + len(FINISH_REASONS)
_SPANS = {"prompt_tokens": (0, _O), "output_tokens": (_O, _F), "finish_reason": (_F, _WIDTH)}
_FINISH_INDEX = {r: i for i, r in enumerate(FINISH_REASONS)}

Key = tuple[str, str]  # (model, version)


def length_bin(tokens: int) -> int:
    """The log2 bin of a token count: 0 → 0, 1 → 1, 2-3 → 2, 4-7 → 3, ..., ≥ 2^17 → 18 (negative → 0).

    >>> [length_bin(n) for n in (0, 1, 2, 3, 4, 7, 8, 2**17 - 1, 2**17, 10**9)]
    [0, 1, 2, 2, 3, 3, 4, 17, 18, 18]
    """
    return min(max(int(tokens), 0).bit_length(), LENGTH_BINS - 1)


def finish_bin(reason: str | None) -> int:
    """The index of a finish reason in ``FINISH_REASONS``; None and unknown reasons are "other"."""
    return _FINISH_INDEX.get(reason or "other", _FINISH_INDEX["other"])


def psi(expected: Sequence[float], actual: Sequence[float], epsilon: float = PSI_EPSILON) -> float:
    """PSI = Σ_i (a_i − e_i) · ln(a_i / e_i) over bins (see the module docstring for the sources).

    ``expected`` and ``actual`` are counts (or proportions) over the same bins; each is normalised to
    proportions, and a proportion below ``epsilon`` is raised to it so empty bins stay finite.

    >>> round(psi([50, 30, 20], [30, 30, 40]), 4)  # 0.2·ln(0.5/0.3) + 0.2·ln(0.4/0.2)
    0.2408
    >>> psi([1, 2, 0], [2, 4, 0])
    0.0
    """
    if len(expected) != len(actual):
        raise ValueError(f"bins differ: {len(expected)} expected, {len(actual)} actual")
    total_e, total_a = float(sum(expected)), float(sum(actual))
    if total_e <= 0 or total_a <= 0:
        raise ValueError("PSI needs a non-empty expected and actual distribution")
    index = 0.0
    for e_count, a_count in zip(expected, actual, strict=True):
        e = max(e_count / total_e, epsilon)
        a = max(a_count / total_a, epsilon)
        index += (a - e) * math.log(a / e)
    return index


@dataclass(frozen=True)
class Histogram:
    """Bin counts of the three features over a set of requests (each request adds 1 to each feature).

    >>> h = Histogram.of(100, 7, "stop") + Histogram.of(3, 0, None)
    >>> h.requests, h.prompt_tokens[length_bin(100)], h.finish_reason
    (2, 1, (1, 0, 0, 0, 1))
    """

    prompt_tokens: tuple[int, ...] = (0,) * LENGTH_BINS
    output_tokens: tuple[int, ...] = (0,) * LENGTH_BINS
    finish_reason: tuple[int, ...] = (0,) * len(FINISH_REASONS)

    def __post_init__(self) -> None:
        # Histograms cross process boundaries: refuse a malformed one here rather than mis-bin later.
        sizes = (len(self.prompt_tokens), len(self.output_tokens), len(self.finish_reason))
        if sizes != (LENGTH_BINS, LENGTH_BINS, len(FINISH_REASONS)):
            raise ValueError(f"histogram bin counts {sizes} are not {LENGTH_BINS, LENGTH_BINS, len(FINISH_REASONS)}")
        sums = {sum(self.prompt_tokens), sum(self.output_tokens), sum(self.finish_reason)}
        if len(sums) != 1 or min(self.prompt_tokens + self.output_tokens + self.finish_reason) < 0:
            raise ValueError("histogram counts must be non-negative and sum to the same number per feature")

    @classmethod
    def of(cls, prompt_tokens: int, output_tokens: int, finish_reason: str | None) -> Histogram:
        """The histogram of one request."""
        flat = [0] * _WIDTH
        _count(flat, prompt_tokens, output_tokens, finish_reason)
        return _from_flat(flat)

    @property
    def requests(self) -> int:
        return sum(self.finish_reason)

    def feature(self, name: str) -> tuple[int, ...]:
        """The bin counts of one of ``FEATURES``."""
        if name not in _SPANS:
            raise KeyError(name)
        return getattr(self, name)

    def __add__(self, other: Histogram) -> Histogram:
        return _from_flat([x + y for x, y in zip(_flat(self), _flat(other), strict=True)])


def _count(flat: list[int], prompt_tokens: int, output_tokens: int, finish_reason: str | None) -> None:
    flat[length_bin(prompt_tokens)] += 1
    flat[_O + length_bin(output_tokens)] += 1
    flat[_F + finish_bin(finish_reason)] += 1


def _flat(h: Histogram) -> list[int]:
    return [*h.prompt_tokens, *h.output_tokens, *h.finish_reason]


def _from_flat(flat: Sequence[int]) -> Histogram:
    return Histogram(tuple(flat[:_O]), tuple(flat[_O:_F]), tuple(flat[_F:]))


@dataclass(frozen=True)
class DriftCounts:
    """What a replica's ``DriftRecorder`` hands the aggregator: per (model, version) histograms, and how
    many requests it could not track (``dropped``). Picklable; treat ``histograms`` as read-only.

    >>> a = DriftCounts({("m", "v1"): Histogram.of(10, 5, "stop")})
    >>> b = DriftCounts({("m", "v1"): Histogram.of(10, 5, "length")}, dropped=1)
    >>> c = a + b
    >>> c.histograms[("m", "v1")].requests, c.requests, c.dropped
    (2, 2, 1)
    """

    histograms: dict[Key, Histogram] = field(default_factory=dict)
    dropped: int = 0

    @property
    def requests(self) -> int:
        return sum(h.requests for h in self.histograms.values())

    def add(self, other: DriftCounts) -> DriftCounts:
        """The counts of both (a new value; neither operand changes)."""
        merged = dict(self.histograms)
        for key, h in other.histograms.items():
            merged[key] = merged[key] + h if key in merged else h
        return DriftCounts(merged, self.dropped + other.dropped)

    __add__ = add


def _name_ok(model: str, version: str) -> bool:
    return len(model) <= MAX_NAME_CHARS and len(version) <= MAX_NAME_CHARS


class DriftRecorder:
    """The replica's side: counts requests as they finish (O(1)); ``take`` hands over and resets them.

    At most ``max_keys`` (model, version) pairs are held between two ``take`` calls; a request of any
    further pair (or with a name over ``MAX_NAME_CHARS``) is only counted in ``dropped``. Thread-safe, so
    ``take`` may run on a metrics thread while the event loop records.

    >>> r = DriftRecorder()
    >>> r.observe("m", "v1", prompt_tokens=100, output_tokens=20, finish_reason="stop")
    >>> r.take().requests, r.take().requests
    (1, 0)
    """

    def __init__(self, max_keys: int = 256) -> None:
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._pending: dict[Key, list[int]] = {}
        self._dropped = 0

    def observe(self, model: str, version: str, prompt_tokens: int, output_tokens: int,
                finish_reason: str | None) -> None:
        key = (model, version)
        with self._lock:
            flat = self._pending.get(key)
            if flat is None:
                if len(self._pending) >= self.max_keys or not _name_ok(model, version):
                    self._dropped += 1
                    return
                flat = self._pending[key] = [0] * _WIDTH
            _count(flat, prompt_tokens, output_tokens, finish_reason)

    def take(self) -> DriftCounts:
        """The counts since the last ``take``; the recorder starts again from nothing."""
        with self._lock:
            pending, dropped = self._pending, self._dropped
            self._pending, self._dropped = {}, 0
        return DriftCounts({key: _from_flat(flat) for key, flat in pending.items()}, dropped)


class _Slice:
    """Counts of the requests that arrived in [index·slice_s, (index + 1)·slice_s)."""

    __slots__ = ("bins", "index", "n")

    def __init__(self, index: int) -> None:
        self.index, self.n, self.bins = index, 0, [0] * _WIDTH


class _KeyState:
    """One (model, version). Invariants: ``recent`` / ``recent_n`` are the sums over ``slices``, whose
    indexes strictly increase; ``baseline_n`` only grows until ``reset``."""

    __slots__ = ("baseline", "baseline_n", "last_seen", "recent", "recent_n", "slices")

    def __init__(self, now: float) -> None:
        self.last_seen = now
        self.reset()

    def reset(self) -> None:
        self.baseline, self.baseline_n = [0] * _WIDTH, 0
        self.slices: deque[_Slice] = deque()
        self.recent, self.recent_n = [0] * _WIDTH, 0

    def expire(self, current: int, n_slices: int) -> None:
        while self.slices and self.slices[0].index <= current - n_slices:
            old = self.slices.popleft()
            for i, c in enumerate(old.bins):
                self.recent[i] -= c
            self.recent_n -= old.n


class DriftTracker:
    """The aggregator's side: per (model, version) a baseline and a recent window, and their PSI gauges.

    - Baseline: the first ``baseline_size`` requests of the pair, then frozen (until ``reset_baseline``).
      Counts merged from another process arrive in batches and a batch is not split, so a merged baseline
      may overshoot ``baseline_size`` by less than one batch.
    - Recent window: the requests after the baseline that arrived in the last ``window_s`` seconds, kept as
      counts per ``slice_s`` slice, so memory per pair is bounded (``window_s / slice_s`` slices of
      ``_WIDTH`` ints) whatever the traffic. A request stays in it for at most ``window_s`` and at least
      ``window_s − slice_s`` seconds. ``now`` is whatever clock the caller uses (one clock per tracker);
      a ``now`` earlier than the newest slice counts in the newest slice.
    - Gauges: only for pairs whose baseline is full and whose recent window holds ≥ ``min_recent``
      requests; other pairs are absent, not 0.
    - Bound: at most ``max_keys`` pairs. A new pair beyond the cap takes the place of the pair seen least
      recently if that one has seen nothing for ``window_s`` (its gauge was gone anyway); otherwise the new
      pair's requests are counted in ``dropped`` and not tracked, so hostile model names can neither grow
      memory nor displace a pair that is in use. Names over ``MAX_NAME_CHARS`` are dropped too.

    Not thread-safe: call it from one thread (the aggregator's event loop).

    >>> t = DriftTracker(baseline_size=1, min_recent=1, window_s=60.0)
    >>> t.observe("m", "v1", 100, 20, "stop", now=0.0)    # the baseline
    >>> t.observe("m", "v1", 100, 20, "length", now=1.0)  # the recent window
    >>> sorted(f for (_, _, f) in t.gauges(now=1.0)), t.gauges(now=61.0)
    (['finish_reason', 'output_tokens', 'prompt_tokens'], {})
    """

    def __init__(self, baseline_size: int = 500, window_s: float = 600.0, min_recent: int = 100,
                 slice_s: float = 10.0, max_keys: int = 256, epsilon: float = PSI_EPSILON) -> None:
        if baseline_size < 1 or min_recent < 1 or max_keys < 1:
            raise ValueError("baseline_size, min_recent and max_keys must be ≥ 1")
        if not 0 < slice_s <= window_s:
            raise ValueError("need 0 < slice_s ≤ window_s")
        self.baseline_size, self.window_s, self.min_recent = baseline_size, window_s, min_recent
        self.slice_s, self.max_keys, self.epsilon = slice_s, max_keys, epsilon
        self.n_slices = math.ceil(window_s / slice_s)
        self.dropped = 0  # requests not tracked: pairs beyond the cap, over-long names, and recorders' drops
        self._keys: dict[Key, _KeyState] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def observe(self, model: str, version: str, prompt_tokens: int, output_tokens: int,
                finish_reason: str | None, now: float) -> None:
        """Count one finished request."""
        for bins in self._targets((model, version), 1, now):
            _count(bins, prompt_tokens, output_tokens, finish_reason)

    def merge(self, counts: DriftCounts, now: float) -> None:
        """Count requests binned elsewhere (a ``DriftRecorder.take()``) as having arrived at ``now``."""
        self.dropped += counts.dropped
        for key, h in counts.histograms.items():
            n = h.requests
            if n == 0:
                continue
            flat = _flat(h)
            for bins in self._targets(key, n, now):
                for i, c in enumerate(flat):
                    bins[i] += c

    def reset_baseline(self, model: str, version: str) -> None:
        """Start the pair over: its next ``baseline_size`` requests become the baseline (e.g. after a shift
        was judged intended). The recent window is emptied too, as it was measured against the old one."""
        state = self._keys.get((model, version))
        if state is not None:
            state.reset()

    def baseline(self, model: str, version: str) -> Histogram | None:
        """The pair's baseline counts so far (None for an untracked pair)."""
        state = self._keys.get((model, version))
        return None if state is None else _from_flat(state.baseline)

    def recent(self, model: str, version: str, now: float) -> Histogram | None:
        """The pair's recent-window counts at ``now`` (None for an untracked pair)."""
        state = self._keys.get((model, version))
        if state is None:
            return None
        state.expire(self._slice_index(now), self.n_slices)
        return _from_flat(state.recent)

    def gauges(self, now: float) -> dict[tuple[str, str, str], float]:
        """PSI of each feature, keyed (model, version, feature), for the pairs that have enough data."""
        current = self._slice_index(now)
        out: dict[tuple[str, str, str], float] = {}
        for (model, version), state in self._keys.items():
            state.expire(current, self.n_slices)
            if state.baseline_n < self.baseline_size or state.recent_n < self.min_recent:
                continue
            for feature, (lo, hi) in _SPANS.items():
                out[(model, version, feature)] = psi(state.baseline[lo:hi], state.recent[lo:hi], self.epsilon)
        return out

    def _slice_index(self, now: float) -> int:
        return math.floor(now / self.slice_s)

    def _targets(self, key: Key, n: int, now: float) -> tuple[list[int], ...]:
        """Where a batch of ``n`` requests arriving at ``now`` is counted (the bins to add it to), with the
        request counts already updated; () when it is dropped."""
        state = self._keys.get(key)
        if state is None:
            state = self._admit(key, now)
            if state is None:
                self.dropped += n
                return ()
        state.last_seen = max(state.last_seen, now)
        if state.baseline_n < self.baseline_size:
            state.baseline_n += n
            return (state.baseline,)
        current = self._slice_index(now)
        state.expire(current, self.n_slices)
        if not state.slices or state.slices[-1].index < current:
            state.slices.append(_Slice(current))
        newest = state.slices[-1]
        newest.n += n
        state.recent_n += n
        return (newest.bins, state.recent)

    def _admit(self, key: Key, now: float) -> _KeyState | None:
        if not _name_ok(*key):
            return None
        if len(self._keys) >= self.max_keys:
            idlest = min(self._keys, key=lambda k: self._keys[k].last_seen)
            if now - self._keys[idlest].last_seen < self.window_s:
                return None
            del self._keys[idlest]
        state = self._keys[key] = _KeyState(now)
        return state
