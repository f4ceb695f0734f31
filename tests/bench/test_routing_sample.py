"""bench/routing_sample.py: the real `LeastLoad` driven by the noise-free replay."""

from __future__ import annotations

import math
import random

from bench.routing_replay import capacity, fleet, prepare, replay
from bench.routing_sample import StrategyRule, cell
from bench.routing_workload import mix_means, open_schedule
from lmfleet.routing.least_load import LeastLoad


def test_the_rule_asks_the_strategy_with_each_nodes_exact_requests() -> None:
    """A node four times slower gets requests only once the fast one holds about four
    times more: with the counts missing, the fast node would get every request."""
    nodes = fleet([1.0, 0.25])
    schedule = open_schedule("chat", 1, 400, 0.9 * capacity(nodes, mix_means("chat")))
    rule = StrategyRule(LeastLoad(rng=random.Random(1), sample_above=math.inf), nodes)
    result = replay(schedule, nodes, rule, prepare(schedule))
    slow = result.node.count(1) / len(result.node)
    assert 0.05 < slow < 0.35, slow  # its share of the capacity is 20 %


def test_a_cell_compares_the_sampled_pick_with_every_node() -> None:
    out = cell(80, 0.9, "fewfast", [7000], per_node=4, sample=32)
    assert set(out) == {"sampled", "every"}
    for rows in out.values():
        assert len(rows) == 1 and all(math.isfinite(p) and p > 0 for p in rows[0])
