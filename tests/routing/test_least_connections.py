"""LeastConnections: minimum in-flight, ties rotate."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.routing import LeastConnections, RequestInfo


def node(name: str, inflight: int = 0) -> NodeState:
    return NodeState(url=f"http://{name}:1", status=NodeStatus.HEALTHY, inflight=inflight)


def test_name() -> None:
    assert LeastConnections.name == "least_connections"


def test_unique_minimum_wins() -> None:
    nodes = [node("a", 3), node("b", 1), node("c", 2)]
    assert LeastConnections().pick(nodes, RequestInfo()) == nodes[1]


def test_ties_rotate_in_url_order() -> None:
    strategy = LeastConnections()
    nodes = [node("c", 0), node("a", 0), node("b", 5)]
    picks = [strategy.pick(nodes, RequestInfo()).url for _ in range(4)]  # type: ignore[union-attr]
    assert picks == ["http://a:1", "http://c:1", "http://a:1", "http://c:1"]


def test_idle_fleet_is_spread_evenly() -> None:
    """Requests that finish before the next arrives: all nodes always tie at 0."""
    strategy = LeastConnections()
    nodes = [node(name) for name in "abcd"]
    counts = Counter(strategy.pick(nodes, RequestInfo()).url for _ in range(400))  # type: ignore[union-attr]
    assert set(counts.values()) == {100}


def test_recovered_node_gets_traffic() -> None:
    strategy = LeastConnections()
    fleet = [node("a"), node("b")]
    for _ in range(3):
        strategy.pick(fleet, RequestInfo())
    fleet.append(node("0-recovered"))  # sorts first, but must not get every tie either
    picks = [strategy.pick(fleet, RequestInfo()).url for _ in range(6)]  # type: ignore[union-attr]
    assert Counter(picks) == {"http://0-recovered:1": 2, "http://a:1": 2, "http://b:1": 2}


@given(st.lists(st.integers(0, 20), min_size=1, max_size=30), st.integers(0, 10))
def test_always_a_minimum_node(loads: list[int], warmup: int) -> None:
    nodes = [node(f"n{i:02d}", load) for i, load in enumerate(loads)]
    strategy = LeastConnections()
    for _ in range(warmup):
        strategy.pick(nodes, RequestInfo())
    chosen = strategy.pick(nodes, RequestInfo())
    assert chosen in nodes
    assert chosen.inflight == min(loads)  # type: ignore[union-attr]
