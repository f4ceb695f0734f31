"""Priority tiers: Envoy's health rule, then spilling by load with a margin."""

from __future__ import annotations

import math

import pytest

from lmfleet.errors import ConfigError
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.routing.tiers import choose_tier, health_shares, parse_priorities, parse_priority


def node(name: str, priority: int, inflight: int = 0, status: NodeStatus = NodeStatus.HEALTHY):
    return NodeState(
        url=f"http://{name}:1", status=status, priority=priority, inflight=inflight, speed=1.0
    )


def pick(nodes: list[NodeState], draw: float = 0.5, margin: float = 2.0) -> list[str]:
    healthy = [n for n in nodes if n.status is NodeStatus.HEALTHY]
    choice = choose_tier(healthy, nodes, draw=draw, now=0.0, spill_margin=margin)
    return [n.url.removeprefix("http://").removesuffix(":1") for n in choice.nodes]


def test_envoy_shares_with_overprovisioning_1_4() -> None:
    assert health_shares([(2, 2), (1, 1)]) == [1.0, 0.0]
    # 5 of 7 healthy: 1.4 x 5/7 = 1.0, the tier keeps everything.
    assert health_shares([(5, 7), (1, 1)]) == pytest.approx([1.0, 0.0])
    # 1 of 2: 70 % stay, 30 % spill to the next tier.
    assert health_shares([(1, 2), (1, 1)]) == pytest.approx([0.7, 0.3])
    assert health_shares([(0, 2), (1, 1)]) == [0.0, 1.0]
    # Every tier short: the shares are scaled to add up to 1 (Envoy's "degraded").
    assert health_shares([(1, 4), (1, 4)]) == pytest.approx([0.5, 0.5])


def test_a_healthy_best_tier_keeps_light_traffic() -> None:
    nodes = [node("a", 100), node("b", 100), node("c", 50)]
    for draw in (0.0, 0.5, 0.999):
        assert pick(nodes, draw) == ["a", "b"]


def test_no_tiers_means_every_candidate() -> None:
    nodes = [node("a", 0), node("b", 0, inflight=9)]
    assert pick(nodes) == ["a", "b"]


def test_health_spills_by_the_draw() -> None:
    nodes = [node("a", 100), node("b", 100, status=NodeStatus.UNHEALTHY), node("c", 50)]
    assert pick(nodes, draw=0.69) == ["a"]
    assert pick(nodes, draw=0.71) == ["c"]
    healthy = [n for n in nodes if n.routable]
    choice = choose_tier(healthy, nodes, draw=0.71, now=0.0, spill_margin=2.0)
    assert choice.spilled == "health"
    assert "tier 100: 1/2 healthy, 70% of requests" in choice.note


def test_asleep_and_dead_best_tier_sends_everything_down() -> None:
    nodes = [
        node("a", 100, status=NodeStatus.SLEEPING),
        node("b", 100, status=NodeStatus.UNHEALTHY),
        node("c", 50),
    ]
    assert pick(nodes, draw=0.0) == ["c"]


def test_load_spills_only_past_the_margin() -> None:
    # Expected waits (speed 1): a and b hold 2 -> 3 s; c idle -> 1 s; 1 x 2 < 3: spill.
    busy = [node("a", 100, inflight=2), node("b", 100, inflight=2), node("c", 50)]
    assert pick(busy) == ["c"]
    # One request each: 2 s against 1 x 2 = 2 s, not below: stay.
    light = [node("a", 100, inflight=1), node("b", 100, inflight=1), node("c", 50)]
    assert pick(light) == ["a", "b"]
    # The lower node busy too: (1 + 1) x 2 = 4 > 3: stay.
    both = [node("a", 100, inflight=2), node("b", 100, inflight=2), node("c", 50, inflight=1)]
    assert pick(both) == ["a", "b"]
    # No spilling by load at all.
    assert pick(busy, margin=math.inf) == ["a", "b"]


def test_spill_by_load_is_noted() -> None:
    busy = [node("a", 100, inflight=5), node("c", 50)]
    choice = choose_tier(busy, busy, draw=0.0, now=0.0, spill_margin=2.0)
    assert choice.spilled == "load"
    assert "spilled by load below tier 100" in choice.note


def test_priorities_are_integers() -> None:
    assert parse_priority("50", "x") == 50
    assert parse_priority(100.0, "x") == 100
    assert parse_priorities(None, 2) == [0, 0]
    for bad in (True, "high", 1.5, None):
        with pytest.raises(ConfigError, match="integer"):
            parse_priority(bad, "x")
    with pytest.raises(ConfigError, match="one integer per URL"):
        parse_priorities([1], 2)


def test_nodes_taken_out_on_purpose_count_in_no_tier() -> None:
    """Stopped and draining nodes are out of their tier's size (its health is 2 of 2
    here, not 2 of 7), and a priority only they have is no tier at all."""
    nodes = [node("a", 1), node("b", 1), node("low", 0)]
    nodes += [node(f"s{i}", 1, status=NodeStatus.STOPPED) for i in range(3)]
    nodes += [node(f"d{i}", 1, status=NodeStatus.DRAINING) for i in range(2)]
    nodes += [node("gone", 5, status=NodeStatus.STOPPED)]
    assert pick(nodes, draw=0.9) == ["a", "b"]
    healthy = [n for n in nodes if n.status is NodeStatus.HEALTHY]
    note = choose_tier(healthy, nodes, draw=0.9, now=0.0, spill_margin=2.0).note
    assert "tier 5" not in note and "2/2 healthy" in note, note
    asleep = [*nodes, node("z", 1, status=NodeStatus.SLEEPING)]  # asleep counts: 2 of 3
    assert pick(asleep, draw=0.99) == ["low"]
