"""Microbenchmark: microseconds per `pick` over 64 nodes, for every strategy.

The router calls `pick` while holding the registry lock, so it must stay cheap
(target: under 5 us). Run: `python bench/routing_pick.py [--nodes 64] [--picks N]`.
Each pick sees fresh snapshots (varied in-flight counts and latencies, a few
never measured), as the registry hands them over.

`--lease` measures a whole `NodeRegistry.lease` and `release` instead (the
eligibility filter over every node, the pick, the accounting), over a registry of
healthy nodes that each hold up to 4 requests, with `least_load` or `--strategy`
(`prefix_affinity`: each request with one of 997 session keys). There the strategy
gets the registry's kept list of eligible nodes, as in the router, not a new list
each pick.
"""

from __future__ import annotations

import argparse
import random
import time

from lmfleet.node.outliers import Outcome
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.registry import NodeRegistry
from lmfleet.routing import STRATEGIES, RequestInfo

TARGET_US = 5.0


def make_fleets(
    count: int, variants: int, rng: random.Random, *, unmeasured: bool
) -> list[list[NodeState]]:
    """`variants` snapshots of one fleet of `count` nodes (same URLs, new loads).

    With `unmeasured`, one node in 16 has no latency yet (just joined).
    """
    fleets = []
    for _ in range(variants):
        fleets.append(
            [
                NodeState(
                    url=f"http://10.0.{i // 250}.{i % 250}:23333",
                    status=NodeStatus.HEALTHY,
                    models=("m",),
                    inflight=rng.randrange(8),
                    latency=None if unmeasured and i % 16 == 0 else rng.uniform(0.1, 2.0),
                )
                for i in range(count)
            ]
        )
    return fleets


def bench(name: str, fleets: list[list[NodeState]], picks: int, keyed: bool) -> float:
    """Median over 5 runs of the mean ns per pick, in microseconds."""
    strategy = STRATEGIES[name](random.Random(1))
    requests = [
        RequestInfo(model="m", affinity_key=f"session-{i}" if keyed else None) for i in range(997)
    ]
    variants = len(fleets)
    for i in range(1000):  # warm caches (sorted order, hash ring)
        strategy.pick(fleets[i % variants], requests[i % 997])
    runs = []
    for _ in range(5):
        start = time.perf_counter_ns()
        for i in range(picks):
            strategy.pick(fleets[i % variants], requests[i % 997])
        runs.append((time.perf_counter_ns() - start) / picks / 1000)
    return sorted(runs)[2]


def lease_us(count: int, leases: int, name: str = "least_load", tiers: bool = False) -> float:
    """Median over 3 runs of microseconds per `lease` + `release` with strategy `name`."""
    rng = random.Random(0)
    registry = NodeRegistry()
    for i in range(count):
        url = f"http://10.0.{i // 250}.{i % 250}:23333"
        registry.add(url, models=("m",), priority=i % 2 if tiers else None)
        latency = rng.uniform(0.1, 2.0)
        registry.modify(
            url, lambda s, t=latency: s.evolve(status=NodeStatus.HEALTHY, latency=t, capacity=8.0)
        )
    strategy = STRATEGIES[name](random.Random(1))
    keyed = strategy.uses_affinity_key
    requests = [
        RequestInfo(model="m", affinity_key=f"session-{i}" if keyed else None) for i in range(997)
    ]
    held: list[str] = []
    runs = []
    for _ in range(3):
        start = time.perf_counter_ns()
        for i in range(leases):
            node = registry.lease(strategy, requests[i % 997])
            assert node is not None
            held.append(node.url)
            if len(held) > 4 * count:
                registry.release(held.pop(0), Outcome.SUCCESS, latency=0.5)
        runs.append((time.perf_counter_ns() - start) / leases / 1000)
    return sorted(runs)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--picks", type=int, default=50_000)
    parser.add_argument("--lease", action="store_true", help="a whole lease and release")
    parser.add_argument("--strategy", default="least_load", choices=sorted(STRATEGIES))
    parser.add_argument("--tiers", action="store_true", help="half the nodes priority 1, half 0")
    args = parser.parse_args()
    if args.lease:
        us = lease_us(args.nodes, 5000, args.strategy, args.tiers)
        tiered = " in 2 tiers" if args.tiers else ""
        print(
            f"{args.nodes} nodes{tiered}: {args.strategy} lease + release {us:.1f} us "
            "(median of 3 x 5,000)"
        )
        return
    steady = make_fleets(args.nodes, 16, random.Random(0), unmeasured=False)
    joined = make_fleets(args.nodes, 16, random.Random(0), unmeasured=True)
    cases = [(name, False, steady, "") for name in STRATEGIES]
    cases[-1] = ("prefix_affinity", False, steady, " (no key)")
    cases += [
        ("prefix_affinity", True, steady, " (keyed)"),
        ("min_observed_latency", False, joined, " (4 unmeasured)"),
        ("min_expected_latency", False, joined, " (4 unmeasured)"),
    ]
    print(f"{args.nodes} nodes, {args.picks} picks per run, median of 5 runs")
    for name, keyed, fleets, note in cases:
        us = bench(name, fleets, args.picks, keyed)
        flag = "ok" if us < TARGET_US else "SLOW"
        print(f"  {name + note:40s} {us:6.2f} us/pick  {flag}")


if __name__ == "__main__":
    main()
