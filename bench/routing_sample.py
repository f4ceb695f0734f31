"""Does `least_load`'s sampled pick cost routing quality? The noise-free replay says.

Over `least_load.SAMPLE_ABOVE` candidates a `least_load` pick ranks a random sample
of `SAMPLE` of them and the last pick's best two instead of every one
(lmfleet/routing/least_load.py), so that a pick costs the same at 512 nodes as at
64. This replays the same schedules (bench/routing_replay.py: the simulator's own
cost model, exact node states, no noise) through the real `LeastLoad.pick`, once
as shipped and once ranking every node, and reports per cell the paired ratio
sampled / every node of p50, p90 and p99 over seeds (geometric mean, bootstrap 95 %
interval). The client knows each node's exact requests (one client, as its own
in-flight counts) and the operator's speeds; each node's batch capacity is known
(as learned from its `/metrics`).

Fleets: "mix3" repeats speeds 1, 1, 1/3 (the routing benchmark's fleet);
"fewfast" has one node in ten four times faster (the case a sample can miss).
The first tenth of each schedule's requests is left out (warm-up).

    .venv/bin/python -m bench.routing_sample                      # ~22 min on one core
    .venv/bin/python -m bench.routing_sample --nodes 512 --loads 0.99 --seeds 3
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Sequence

from bench.routing_replay import NodeModel, View, capacity, fleet, prepare, replay
from bench.routing_stats import bootstrap_ratio, percentile
from bench.routing_workload import mix_means, open_schedule
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.routing import RequestInfo
from lmfleet.routing.least_load import SAMPLE, SAMPLE_ABOVE, LeastLoad

SCALE, COARSEN = 8.0, 4  # the routing benchmark's `--scale 8 --coarsen 4`
_REQUEST = RequestInfo(model="m")
FLEETS = {
    "mix3": lambda n: [(1.0, 1.0, 0.333)[i % 3] for i in range(n)],
    "fewfast": lambda n: [4.0 if i % 10 == 0 else 1.0 for i in range(n)],
}


class StrategyRule:
    """A replay rule that asks a real `LeastLoad` for each pick.

    It keeps one `NodeState` per replayed node, evolved only when that node's load
    changed since the previous pick (its requests running and queued: what a lone
    client's in-flight count is)."""

    def __init__(self, strategy: LeastLoad, nodes: Sequence[NodeModel]) -> None:
        self.strategy = strategy
        self.states = [
            NodeState(
                url=f"http://10.0.{i // 250}.{i % 250}:23333",
                status=NodeStatus.HEALTHY,
                models=("m",),
                speed=model.speed,
                capacity=float(model.max_batch),
            )
            for i, model in enumerate(nodes)
        ]
        self.index = {state.url: i for i, state in enumerate(self.states)}

    def __call__(self, view: View, request: int) -> int:
        states = self.states
        for i, node in enumerate(view.nodes):
            if states[i].inflight != node.load:
                states[i] = states[i].evolve(inflight=node.load)
        chosen = self.strategy.pick(states, _REQUEST)
        assert chosen is not None
        return self.index[chosen.url]


def cell(count: int, load: float, kind: str, seeds: Sequence[int], per_node: int, sample: int):
    """{variant: [(p50, p90, p99) per seed]} for one fleet size, load and fleet kind."""
    nodes = tuple(n.scaled(SCALE).coarsened(COARSEN) for n in fleet(FLEETS[kind](count)))
    rate = load * capacity(nodes, mix_means("chat", COARSEN))
    out: dict[str, list[tuple[float, float, float]]] = {"sampled": [], "every": []}
    for seed in seeds:
        schedule = open_schedule("chat", seed, per_node * count, rate, coarsen=COARSEN)
        prepared = prepare(schedule)
        for variant, above in (("sampled", SAMPLE_ABOVE), ("every", math.inf)):
            strategy = LeastLoad(rng=random.Random(seed), sample_above=above, sample=sample)
            result = replay(schedule, nodes, StrategyRule(strategy, nodes), prepared)
            kept = [x for x in result.latency[len(result.latency) // 10 :] if not math.isnan(x)]
            out[variant].append(tuple(percentile(kept, q) for q in (0.5, 0.9, 0.99)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", default="128,256,512", help="fleet sizes, comma-separated")
    parser.add_argument("--loads", default="0.8,0.95,0.99", help="shares of capacity")
    parser.add_argument("--fleets", default="mix3,fewfast", help=", ".join(FLEETS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--requests-per-node", type=int, default=40)
    parser.add_argument("--sample", type=int, default=SAMPLE, help="nodes a sampled pick ranks")
    args = parser.parse_args()
    seeds = range(7000, 7000 + args.seeds)
    print(
        f"least_load ranking a sample of {args.sample} over {SAMPLE_ABOVE} candidates / ranking "
        f"every node; seeds {seeds.start}-{seeds.stop - 1}, {args.requests_per_node} requests "
        "per node; geometric mean [95 % bootstrap interval] of per-seed ratios\n"
    )
    print("| nodes | fleet | load | p50 | p90 | p99 | replay s |")
    print("|---|---|---|---|---|---|---|")
    for count in (int(x) for x in args.nodes.split(",")):
        for kind in args.fleets.split(","):
            for load in (float(x) for x in args.loads.split(",")):
                started = time.monotonic()
                out = cell(count, load, kind, seeds, args.requests_per_node, args.sample)
                ratios = [
                    bootstrap_ratio([s[k] for s in out["sampled"]], [e[k] for e in out["every"]])
                    for k in range(3)
                ]
                took = time.monotonic() - started
                row = " | ".join(str(r) for r in ratios)
                print(f"| {count} | {kind} | {load:.0%} | {row} | {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
