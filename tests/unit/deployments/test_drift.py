"""Drift gauges: PSI as the formula says, on fixed bins, over a frozen baseline and a sliding recent window,
the same whether counted in one process or merged from several, and bounded in keys and memory."""

from __future__ import annotations

import doctest
import math
import pickle
import random

import pytest

from deployments import drift
from deployments.drift import (
    FINISH_REASONS,
    LENGTH_BINS,
    DriftCounts,
    DriftRecorder,
    DriftTracker,
    Histogram,
    finish_bin,
    length_bin,
    psi,
)


def lognormal_lengths(rng: random.Random, mean: float, n: int, sigma: float = 0.8) -> list[int]:
    mu = math.log(mean) - sigma**2 / 2  # E[exp(N(mu, sigma²))] = exp(mu + sigma²/2) = mean
    return [int(rng.lognormvariate(mu, sigma)) for _ in range(n)]


def reasons(rng: random.Random, n: int, p_stop: float) -> list[str]:
    return ["stop" if rng.random() < p_stop else "length" for _ in range(n)]


def feed(t: DriftTracker, prompts: list[int], outputs: list[int], finishes: list[str], now: float,
         key: tuple[str, str] = ("m", "v1")) -> None:
    for p, o, f in zip(prompts, outputs, finishes, strict=True):
        t.observe(*key, p, o, f, now)


def test_the_docstring_examples_run():
    assert doctest.testmod(drift).failed == 0


def test_length_bins_are_fixed_log2_bins_up_to_the_cap():
    assert [length_bin(n) for n in (0, 1, 2, 3, 4, 7, 8, 15, 16)] == [0, 1, 2, 2, 3, 3, 4, 4, 5]
    for k in range(1, 18):  # bin k holds [2^(k-1), 2^k - 1]
        assert length_bin(2 ** (k - 1)) == k and length_bin(2**k - 1) == k
    assert length_bin(2**17) == length_bin(10**12) == LENGTH_BINS - 1 == 18
    assert length_bin(-5) == 0


def test_finish_reasons_are_a_fixed_vocabulary():
    assert [finish_bin(r) for r in FINISH_REASONS] == list(range(5))
    assert finish_bin(None) == finish_bin("tool_calls") == finish_bin("") == FINISH_REASONS.index("other")


def test_psi_matches_the_formula_on_a_hand_computed_case():
    # e = (0.5, 0.3, 0.2), a = (0.3, 0.3, 0.4): Σ (a - e) ln(a / e)
    by_hand = (0.3 - 0.5) * math.log(0.3 / 0.5) + 0.0 + (0.4 - 0.2) * math.log(0.4 / 0.2)
    assert psi([50, 30, 20], [30, 30, 40]) == pytest.approx(by_hand, rel=1e-12)
    assert psi([0.5, 0.3, 0.2], [3, 3, 4]) == pytest.approx(by_hand, rel=1e-12)  # counts are normalised
    assert psi([30, 30, 40], [50, 30, 20]) == pytest.approx(by_hand, rel=1e-12)  # symmetric


def test_psi_floors_empty_bins_at_epsilon():
    # e = (1, 0 -> 1e-4), a = (0.5, 0.5), not renormalised
    by_hand = (0.5 - 1.0) * math.log(0.5 / 1.0) + (0.5 - 1e-4) * math.log(0.5 / 1e-4)
    assert psi([10, 0], [5, 5]) == pytest.approx(by_hand, rel=1e-12)
    assert psi([10, 0], [5, 5], epsilon=1e-3) == pytest.approx(
        (0.5 - 1.0) * math.log(0.5) + (0.5 - 1e-3) * math.log(0.5 / 1e-3), rel=1e-12)
    assert psi([4, 0, 6], [2, 0, 3]) == 0.0  # a bin empty in both adds nothing


def test_psi_refuses_mismatched_or_empty_inputs():
    with pytest.raises(ValueError):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        psi([0, 0], [1, 2])


def test_identical_distributions_give_psi_near_zero():
    rng = random.Random(1)
    n = 20_000
    t = DriftTracker(baseline_size=n, min_recent=n)
    feed(t, lognormal_lengths(rng, 300, n), lognormal_lengths(rng, 200, n), reasons(rng, n, 0.8), now=0.0)
    feed(t, lognormal_lengths(rng, 300, n), lognormal_lengths(rng, 200, n), reasons(rng, n, 0.8), now=1000.0)
    g = t.gauges(now=1000.0)
    assert set(g) == {("m", "v1", f) for f in drift.FEATURES}
    assert all(0.0 <= v < 0.01 for v in g.values()), g


def _shift(seed: int, before: tuple[float, float, float], after: tuple[float, float, float]) -> dict:
    """PSI gauges after a baseline with (prompt mean, output mean, share of stop) ``before`` and a recent
    window with ``after``, 1000 requests each."""
    rng, n = random.Random(seed), 1000
    t = DriftTracker(baseline_size=n)
    for (prompt, output, stop), now in ((before, 0.0), (after, 1000.0)):
        feed(t, lognormal_lengths(rng, prompt, n), lognormal_lengths(rng, output, n), reasons(rng, n, stop), now=now)
    return {f: v for (_, _, f), v in t.gauges(now=1000.0).items()}


def test_a_prompt_length_shift_shows_on_prompt_tokens_only():
    g = _shift(2, (100, 200, 0.8), (1000, 200, 0.8))
    assert g["prompt_tokens"] > 0.25
    assert g["output_tokens"] < 0.1 and g["finish_reason"] < 0.1


def test_a_finish_reason_shift_shows_on_finish_reason_only():
    g = _shift(3, (100, 200, 0.9), (100, 200, 0.1))
    assert g["finish_reason"] > 0.25
    assert g["prompt_tokens"] < 0.1 and g["output_tokens"] < 0.1


def test_no_gauge_before_the_baseline_fills_nor_before_min_recent():
    t = DriftTracker(baseline_size=10, min_recent=5)
    for _ in range(9):
        t.observe("m", "v1", 100, 10, "stop", now=0.0)
    assert t.gauges(now=0.0) == {} and t.recent("m", "v1", now=0.0).requests == 0
    t.observe("m", "v1", 100, 10, "stop", now=0.0)  # the 10th: baseline full, nothing recent yet
    assert t.baseline("m", "v1").requests == 10 and t.gauges(now=0.0) == {}
    for _ in range(4):
        t.observe("m", "v1", 5000, 10, "length", now=1.0)
    assert t.gauges(now=1.0) == {}  # 4 < min_recent: absent, not 0
    t.observe("m", "v1", 5000, 10, "length", now=1.0)
    g = t.gauges(now=1.0)
    assert g[("m", "v1", "prompt_tokens")] > 0.25 and g[("m", "v1", "output_tokens")] == 0.0


def test_the_baseline_is_frozen_once_full():
    t = DriftTracker(baseline_size=3, min_recent=1)
    for p in (10, 20, 30):
        t.observe("m", "v1", p, 1, "stop", now=0.0)
    frozen = t.baseline("m", "v1")
    for _ in range(50):
        t.observe("m", "v1", 9999, 1, "error", now=1.0)
    assert t.baseline("m", "v1") == frozen and frozen.requests == 3
    assert t.recent("m", "v1", now=1.0).requests == 50  # a request is in one window, never both


def test_old_observations_leave_the_recent_window_after_window_s():
    t = DriftTracker(baseline_size=1, min_recent=1, window_s=600.0, slice_s=10.0)
    t.observe("m", "v1", 100, 10, "stop", now=0.0)  # baseline
    t.observe("m", "v1", 100, 10, "stop", now=0.0)
    t.observe("m", "v1", 100, 10, "stop", now=300.0)
    assert t.recent("m", "v1", now=599.0).requests == 2
    assert ("m", "v1", "prompt_tokens") in t.gauges(now=599.0)
    assert t.recent("m", "v1", now=600.0).requests == 1  # the one at 0 s has aged out, the one at 300 s not
    assert t.recent("m", "v1", now=899.0).requests == 1
    assert t.recent("m", "v1", now=900.0).requests == 0
    assert t.gauges(now=900.0) == {}


def test_the_window_slides_and_its_memory_is_bounded():
    t = DriftTracker(baseline_size=1, min_recent=1, window_s=600.0, slice_s=10.0)
    t.observe("m", "v1", 100, 10, "stop", now=0.0)
    for second in range(1, 3601):
        t.observe("m", "v1", 100 if second < 3000 else 4000, 10, "stop", now=float(second))
    recent = t.recent("m", "v1", now=3600.0)
    # slices 301..360 are in the window: seconds 3010..3600, all of them of the shifted kind
    assert recent.requests == 591 and recent.prompt_tokens[length_bin(4000)] == 591
    assert len(t._keys[("m", "v1")].slices) <= t.n_slices == 60  # bounded whatever the traffic


def test_a_clock_that_steps_back_counts_in_the_newest_slice():
    t = DriftTracker(baseline_size=1, min_recent=1)
    t.observe("m", "v1", 100, 10, "stop", now=0.0)
    t.observe("m", "v1", 100, 10, "stop", now=100.0)
    t.observe("m", "v1", 100, 10, "stop", now=50.0)
    assert t.recent("m", "v1", now=100.0).requests == 2
    assert len(t._keys[("m", "v1")].slices) == 1


def test_counts_from_two_recorders_add_up_to_one_recorder_that_saw_everything():
    rng = random.Random(4)
    a, b, both = DriftRecorder(), DriftRecorder(), DriftRecorder()
    for i in range(400):
        key = ("m", "v1") if i % 3 else ("m", "v2")
        row = (rng.randrange(0, 5000), rng.randrange(0, 500), rng.choice([*FINISH_REASONS, None, "weird"]))
        (a if rng.random() < 0.5 else b).observe(*key, *row)
        both.observe(*key, *row)
    ta, tb = a.take(), b.take()
    merged = ta + tb
    assert merged == both.take() and merged.requests == 400
    assert ta.add(tb) == merged and ta.requests + tb.requests == 400  # operands unchanged
    assert pickle.loads(pickle.dumps(merged)) == merged
    assert a.take() == DriftCounts()  # take resets


def test_merging_recorders_equals_observing_everything_in_one_tracker():
    rng = random.Random(5)

    def rows(n: int, mean: float, p_stop: float) -> list[tuple[int, int, str]]:
        return list(zip(lognormal_lengths(rng, mean, n), lognormal_lengths(rng, 50, n), reasons(rng, n, p_stop),
                        strict=True))

    one = DriftTracker(baseline_size=300, min_recent=50)
    many = DriftTracker(baseline_size=300, min_recent=50)
    # batch boundaries fall on the baseline's end, so both fill it with the same requests
    batches = [(0.0, rows(200, 100, 0.8), rows(100, 100, 0.8)), (5.0, rows(120, 800, 0.3), rows(80, 800, 0.3)),
               (17.0, rows(30, 100, 0.8), rows(40, 800, 0.3))]
    for now, rows_a, rows_b in batches:
        ra, rb = DriftRecorder(), DriftRecorder()
        for rec, rs in ((ra, rows_a), (rb, rows_b)):
            for row in rs:
                rec.observe("m", "v1", *row)
                one.observe("m", "v1", *row, now=now)
        many.merge(ra.take(), now)
        many.merge(rb.take(), now)
    assert many.baseline("m", "v1") == one.baseline("m", "v1") and one.baseline("m", "v1").requests == 300
    assert many.recent("m", "v1", 17.0) == one.recent("m", "v1", 17.0) and one.recent("m", "v1", 17.0).requests == 270
    g = one.gauges(now=17.0)
    assert many.gauges(now=17.0) == g and g[("m", "v1", "prompt_tokens")] > 0.25


def test_a_merged_batch_is_not_split_so_the_baseline_may_overshoot():
    t = DriftTracker(baseline_size=20, min_recent=1)
    for _ in range(10):
        t.observe("m", "v1", 100, 10, "stop", now=0.0)
    r = DriftRecorder()
    for _ in range(30):
        r.observe("m", "v1", 100, 10, "stop")
    t.merge(r.take(), now=1.0)
    assert t.baseline("m", "v1").requests == 40 and t.recent("m", "v1", 1.0).requests == 0


def test_the_recorder_caps_its_keys_per_take():
    r = DriftRecorder(max_keys=2)
    for model in ("a", "b", "c", "c"):
        r.observe(model, "v", 1, 1, "stop")
    r.observe("a", "x" * (drift.MAX_NAME_CHARS + 1), 1, 1, "stop")
    counts = r.take()
    assert set(counts.histograms) == {("a", "v"), ("b", "v")} and counts.dropped == 3
    r.observe("c", "v", 1, 1, "stop")  # a new take interval, room again
    assert set(r.take().histograms) == {("c", "v")}


def test_the_tracker_caps_its_keys_and_only_an_idle_key_gives_way():
    t = DriftTracker(baseline_size=1, min_recent=1, max_keys=3, window_s=600.0)
    for model in ("a", "b", "c"):
        t.observe(model, "v", 100, 10, "stop", now=0.0)
    for i in range(1000):  # hostile names while every key is in use: dropped, counted, not tracked
        t.observe(f"evil{i}", "v", 100, 10, "stop", now=1.0)
    assert len(t) == 3 and t.dropped == 1000 and t.baseline("evil0", "v") is None
    t.observe("a", "v", 100, 10, "stop", now=500.0)
    t.observe("b", "v", 100, 10, "stop", now=500.0)
    t.observe("d", "v", 100, 10, "stop", now=599.0)  # "c", idlest, has been idle only 599 s
    assert t.baseline("d", "v") is None and t.dropped == 1001
    t.observe("d", "v", 100, 10, "stop", now=600.0)  # now "c" is idle for window_s: it gives way
    assert len(t) == 3 and t.baseline("c", "v") is None and t.baseline("d", "v").requests == 1
    assert t.baseline("a", "v") is not None and t.baseline("b", "v") is not None
    t.observe("a", "x" * (drift.MAX_NAME_CHARS + 1), 1, 1, "stop", now=600.0)
    assert len(t) == 3 and t.dropped == 1002


def test_merge_counts_the_recorders_drops_and_skips_empty_histograms():
    t = DriftTracker(max_keys=1)
    t.merge(DriftCounts({("m", "v1"): Histogram()}, dropped=7), now=0.0)
    assert t.dropped == 7 and len(t) == 0


def test_reset_baseline_starts_the_pair_over():
    t = DriftTracker(baseline_size=5, min_recent=5)
    feed(t, [10] * 5, [10] * 5, ["stop"] * 5, now=0.0)
    feed(t, [3000] * 5, [10] * 5, ["stop"] * 5, now=1.0)
    assert t.gauges(now=1.0)[("m", "v1", "prompt_tokens")] > 0.25
    t.reset_baseline("m", "v1")
    assert t.gauges(now=1.0) == {} and t.baseline("m", "v1").requests == 0
    feed(t, [3000] * 10, [10] * 10, ["stop"] * 10, now=2.0)  # the new normal: 5 baseline, 5 recent
    assert t.gauges(now=2.0)[("m", "v1", "prompt_tokens")] == 0.0
    t.reset_baseline("nobody", "v")  # unknown pair: nothing happens
    assert len(t) == 1


def test_histograms_refuse_malformed_counts():
    with pytest.raises(ValueError):
        Histogram(prompt_tokens=(1,) + (0,) * LENGTH_BINS)  # one bin too many
    with pytest.raises(ValueError):
        Histogram(prompt_tokens=(1,) + (0,) * (LENGTH_BINS - 1))  # features disagree on the request count
    with pytest.raises(ValueError):
        Histogram((-1, 1) + (0,) * (LENGTH_BINS - 2), (0,) * LENGTH_BINS, (0,) * len(FINISH_REASONS))
    h = Histogram.of(100, 0, "length")
    assert h.feature("finish_reason") == (0, 1, 0, 0, 0) and h.output_tokens[0] == 1
    with pytest.raises(KeyError):
        h.feature("latency")


def test_over_long_names_are_dropped_even_with_room():
    long = "x" * (drift.MAX_NAME_CHARS + 1)
    r = DriftRecorder()
    r.observe(long, "v", 1, 1, "stop")
    r.observe("m", long, 1, 1, "stop")
    assert r.take() == DriftCounts(dropped=2)
    t = DriftTracker()
    t.observe(long, "v", 1, 1, "stop", now=0.0)
    t.merge(DriftCounts({("m", long): Histogram.of(1, 1, "stop")}), now=0.0)
    assert len(t) == 0 and t.dropped == 2
    t.observe("x" * drift.MAX_NAME_CHARS, "v", 1, 1, "stop", now=0.0)  # at the limit: tracked
    assert len(t) == 1
