"""RoundRobin: strict rotation in URL order, stable across node-set changes."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.routing import RequestInfo, RoundRobin


def node(name: str, inflight: int = 0) -> NodeState:
    return NodeState(url=f"http://{name}:1", status=NodeStatus.HEALTHY, inflight=inflight)


def urls(strategy: RoundRobin, nodes: list[NodeState], picks: int) -> list[str]:
    return [strategy.pick(nodes, RequestInfo()).url for _ in range(picks)]  # type: ignore[union-attr]


def test_exactly_even() -> None:
    nodes = [node("c"), node("a"), node("b", inflight=9)]
    counts = Counter(urls(RoundRobin(), nodes, 300))
    assert counts == {"http://a:1": 100, "http://b:1": 100, "http://c:1": 100}


def test_order_is_by_url_not_by_listing() -> None:
    strategy = RoundRobin()
    assert urls(strategy, [node("c"), node("a"), node("b")], 4) == [
        "http://a:1",
        "http://b:1",
        "http://c:1",
        "http://a:1",
    ]
    # The registry may list the same nodes in another order: the rotation goes on.
    assert urls(strategy, [node("b"), node("c"), node("a")], 2) == ["http://b:1", "http://c:1"]


def test_node_leaving_does_not_skip_or_repeat() -> None:
    strategy = RoundRobin()
    assert urls(strategy, [node("a"), node("b"), node("c")], 1) == ["http://a:1"]
    # b leaves (unhealthy): the next is c, then back to a.
    assert urls(strategy, [node("a"), node("c")], 2) == ["http://c:1", "http://a:1"]


def test_node_joining_gets_its_turn_in_order() -> None:
    strategy = RoundRobin()
    assert urls(strategy, [node("a"), node("c")], 1) == ["http://a:1"]
    assert urls(strategy, [node("a"), node("b"), node("c")], 3) == [
        "http://b:1",
        "http://c:1",
        "http://a:1",
    ]


def test_last_node_leaving_wraps_around() -> None:
    strategy = RoundRobin()
    urls(strategy, [node("a"), node("b"), node("c")], 3)  # last = c
    assert urls(strategy, [node("a"), node("b")], 1) == ["http://a:1"]


@given(st.integers(1, 12), st.integers(1, 5))
def test_every_lap_visits_each_node_once(count: int, laps: int) -> None:
    nodes = [node(f"n{i:02d}") for i in range(count)]
    counts = Counter(urls(RoundRobin(), nodes, count * laps))
    assert set(counts.values()) == {laps}
