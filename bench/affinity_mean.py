"""Does `prefix_affinity`'s kept mean bound as the exact mean does?

Over `MEAN_EVERY_ABOVE` candidates a keyed `prefix_affinity` pick keeps the mean of
the candidates' expected waits for one pick per `NODES_PER_PICK` of them (or
`MEAN_SECONDS`) and scores only the nodes its walk visits
(lmfleet/routing/prefix_affinity.py). This drives a real `NodeRegistry` (its kept
list of eligible nodes, leases and releases) with the shipped strategy, and before
each lease asks a second one that takes the exact mean
(`PrefixAffinity(mean_every_above=math.inf)`) over the same snapshot. Load rises
(a release after one lease in five) and drains (two releases a lease) in turns,
three leases per node each; keys are "hot" (Pareto 1.2: one key has over half the
requests, so its walks pass many full nodes) or "many" (10,000 uniform). Reports
the share of picks that were the exact mean's, and the worst pick's expected wait
over the exact bound (1.25 x the exact mean): above 1 only as far as the leases and
releases since the kept mean was taken moved it.

    .venv/bin/python -m bench.affinity_mean                 # 128 and 512 nodes, ~30 s
"""

from __future__ import annotations

import argparse
import math
import random
import time

from lmfleet.node.outliers import Outcome
from lmfleet.node.state import NodeStatus
from lmfleet.registry import NodeRegistry
from lmfleet.routing import PrefixAffinity, RequestInfo
from lmfleet.routing.least_load import expected_waits


def make_registry(count: int, rng: random.Random) -> NodeRegistry:
    """`count` healthy nodes serving "m", each with a latency in [0.5, 2] s."""
    registry = NodeRegistry()
    for i in range(count):
        url = f"http://10.0.{i // 250}.{i % 250}:23333"
        registry.add(url, models=("m",))
        latency = rng.uniform(0.5, 2.0)
        registry.modify(url, lambda s, t=latency: s.evolve(status=NodeStatus.HEALTHY, latency=t))
    return registry


def run(count: int, hot: bool, seed: int) -> tuple[float, int, float]:
    """(share of picks the exact mean's, picks, worst wait / exact bound)."""
    rng = random.Random(seed)
    registry = make_registry(count, rng)
    kept = PrefixAffinity(rng=random.Random(seed))
    exact = PrefixAffinity(mean_every_above=math.inf)
    held: list[str] = []
    same = picks = 0
    worst = 0.0
    for phase in range(6):
        draining = phase % 2 == 1
        for _ in range(3 * count):
            session = int(rng.paretovariate(1.2)) if hot else rng.randrange(10_000)
            request = RequestInfo(model="m", affinity_key=f"s{session}")
            nodes = registry.snapshot()
            expected = exact.pick(nodes, request)
            waits = [wait for wait, _ in expected_waits(nodes, time.monotonic())]
            bound = exact.load_factor * math.fsum(waits) / len(waits)
            chosen = registry.lease(kept, request)
            assert chosen is not None and expected is not None
            picks += 1
            same += chosen.url == expected.url
            worst = max(worst, waits[[n.url for n in nodes].index(chosen.url)] / bound)
            held.append(chosen.url)
            for _ in range(2 if draining else int(rng.random() < 0.2)):
                if held:
                    registry.release(held.pop(rng.randrange(len(held))), Outcome.SUCCESS)
    return same / picks, picks, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", default="128,512", help="comma-separated fleet sizes")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print("nodes  keys  picks  the exact mean's pick  worst wait / exact bound")
    for count in (int(n) for n in args.nodes.split(",")):
        for hot in (True, False):
            results = [run(count, hot, seed) for seed in range(args.seeds)]
            shares = [share for share, _, _ in results]
            picks = sum(p for _, p, _ in results)
            worst = max(w for _, _, w in results)
            print(
                f"{count:5d}  {'hot' if hot else 'many':4s}  {picks:5d}  "
                f"{min(shares):.3f}-{max(shares):.3f}  {worst:.3f}"
            )


if __name__ == "__main__":
    main()
