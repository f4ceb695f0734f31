"""Percentiles and the paired bootstrap of the routing-quality bench."""

from __future__ import annotations

import math

import pytest

from bench.routing_stats import (
    Interval,
    better,
    bootstrap_ratio,
    geomean,
    percentile,
    summary,
    within,
    worse,
)


def test_percentile_interpolates_between_order_statistics() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == pytest.approx(50.5)
    assert percentile(values, 0.99) == pytest.approx(99.01)
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([3.0], 0.99) == 3.0
    assert math.isnan(percentile([], 0.5))


def test_summary_has_the_three_percentiles() -> None:
    out = summary([1.0, 2.0, 3.0])
    assert out == {"p50": 2.0, "p90": pytest.approx(2.8), "p99": pytest.approx(2.98), "n": 3.0}


def test_identical_ratios_give_a_point_interval() -> None:
    got = bootstrap_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert (got.point, got.low, got.high) == pytest.approx((2.0, 2.0, 2.0))


def test_interval_brackets_the_geometric_mean_and_is_reproducible() -> None:
    num = [1.0, 1.3, 0.9, 1.2, 1.1, 1.05, 1.4, 0.95, 1.15, 1.0]
    den = [1.0] * 10
    got = bootstrap_ratio(num, den)
    assert got.low <= got.point <= got.high
    assert got.point == pytest.approx(geomean(num))
    assert bootstrap_ratio(num, den) == got


def test_claims_use_the_far_end_of_the_interval() -> None:
    assert within(Interval(1.05, 0.98, 1.14))
    assert not within(Interval(1.05, 0.98, 1.16))  # point inside, interval not
    assert better(Interval(0.9, 0.8, 0.99))
    assert not better(Interval(0.9, 0.8, 1.01))
    assert worse(Interval(1.2, 1.01, 1.4))


def test_pairs_must_match() -> None:
    with pytest.raises(ValueError):
        bootstrap_ratio([1.0], [1.0, 2.0])
