"""Statistics of the routing-quality bench: percentiles, paired ratios, bootstrap intervals.

Why over seeds: one run's p99 is a handful of samples and moves by tens of percent
between runs. Each seed is one schedule that every router (and the replayed
baselines) got; a router's p99 on a seed is compared with the baseline's p99 on the
same seed (a paired ratio), and the seeds are resampled to get an interval.

The point estimate is the geometric mean of the per-seed ratios (ratios compose by
multiplication, and one slow seed should not dominate); the interval is the
percentile bootstrap of that geometric mean over seeds resampled with replacement.
With 10 seeds a percentile bootstrap is somewhat narrow, so a claim is made only
from the interval's far end ("within 15 %" = upper end below 1.15).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default); NaN if empty.

    Monotone in every value, so if each latency is above its lower bound, each
    percentile is above the lower bound's percentile. A censored value is +inf: a
    percentile that reaches one is +inf (unbounded), not NaN.
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    if math.isinf(ordered[high]):  # censored values (+inf) reach this percentile
        return math.inf if pos > low or math.isinf(ordered[low]) else ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 and the count."""
    out = {name: percentile(values, q) for name, q in QUANTILES.items()}
    out["n"] = float(len(values))
    return out


def geomean(values: Sequence[float]) -> float:
    return math.exp(math.fsum(math.log(v) for v in values) / len(values))


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate and its bootstrap interval."""

    point: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.point:.2f} [{self.low:.2f}, {self.high:.2f}]"


def bootstrap_ratio(
    num: Sequence[float],
    den: Sequence[float],
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Geometric mean over seeds of num[i] / den[i], with a bootstrap interval over seeds.

    `num` and `den` are paired: entry i of both comes from seed i.
    """
    if len(num) != len(den) or not num:
        raise ValueError("need the same, non-zero number of paired values")
    logs = [math.log(a / b) for a, b in zip(num, den, strict=True)]
    rng = random.Random(seed)
    n = len(logs)
    means = sorted(math.fsum(rng.choices(logs, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    low = means[int(tail * (resamples - 1))]
    high = means[math.ceil((1 - tail) * (resamples - 1))]
    return Interval(math.exp(math.fsum(logs) / n), math.exp(low), math.exp(high))


def within(interval: Interval, margin: float = 0.15) -> bool:
    """ "Within 15 %": only when the interval's upper end is below 1 + margin."""
    return interval.high < 1.0 + margin


def better(interval: Interval) -> bool:
    """Better than the denominator: the interval's upper end is below 1."""
    return interval.high < 1.0


def worse(interval: Interval) -> bool:
    """Worse than the denominator: the interval's lower end is above 1."""
    return interval.low > 1.0
