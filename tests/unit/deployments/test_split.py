"""Weighted sticky splits: the ratio within binomial bounds, stickiness, minimal movement on a weight change."""

from __future__ import annotations

import doctest
import math
import random

import pytest

from deployments.ingress import split
from deployments.ingress.resolve import Target
from deployments.ingress.split import choose

V = (Target("v1", 90.0), Target("v2", 10.0))


def within_binomial(hits: int, n: int, p: float, z: float = 4.0) -> bool:
    return abs(hits - n * p) <= z * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("weights", [(90, 10), (50, 50), (75, 25), (1, 99)])
def test_split_ratio_over_400_users_is_within_binomial_bounds(weights):
    ts = (Target("a", weights[0]), Target("b", weights[1]))
    p = weights[1] / sum(weights)
    for seed in range(5):  # several independent populations of 400 users
        hits = sum(choose(ts, f"s{seed}-user-{i}").deployment == "b" for i in range(400))
        assert within_binomial(hits, 400, p), (weights, seed, hits)


def test_unkeyed_requests_split_by_weight():
    rng = random.Random(7)
    hits = sum(choose(V, None, rng).deployment == "v2" for _ in range(400))
    assert within_binomial(hits, 400, 0.1)


def test_one_user_sees_one_version():
    for i in range(200):
        first = choose(V, f"u{i}").deployment
        assert all(choose(V, f"u{i}").deployment == first for _ in range(5))


def test_stepping_the_canary_up_keeps_its_users_and_moves_only_whom_it_must():
    before = {i: choose(V, f"u{i}").deployment for i in range(2000)}
    stepped = (Target("v1", 75.0), Target("v2", 25.0))
    after = {i: choose(stepped, f"u{i}").deployment for i in range(2000)}
    assert all(after[i] == "v2" for i in before if before[i] == "v2")  # canary users stay on the canary
    moved = sum(before[i] != after[i] for i in before)
    assert within_binomial(moved, 2000, 0.15)  # only the 15% that the new weight needs


def test_zero_weight_takes_nothing_and_no_weight_at_all_is_refused():
    drained = (Target("v1", 0.0), Target("v2", 1.0))
    assert {choose(drained, f"u{i}").deployment for i in range(100)} == {"v2"}
    with pytest.raises(ValueError):
        choose((Target("v1", 0.0),), "u")


def test_the_module_example_runs():
    assert doctest.testmod(split).failed == 0
