"""MinExpectedLatency: LMDeploy's expected latency, unmeasured nodes assumed average."""

from __future__ import annotations

import random

from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.routing import MinExpectedLatency, RequestInfo


def node(name: str, latency: float | None, inflight: int = 0) -> NodeState:
    return NodeState(
        url=f"http://{name}:1", status=NodeStatus.HEALTHY, inflight=inflight, latency=latency
    )


def pick(nodes: list[NodeState], seed: int = 0) -> NodeState:
    chosen = MinExpectedLatency(rng=random.Random(seed)).pick(nodes, RequestInfo())
    assert chosen is not None
    return chosen


def test_name() -> None:
    assert MinExpectedLatency.name == "min_expected_latency"


def test_queue_times_latency() -> None:
    # a: 0.1 x 4 = 0.4, b: 0.3 x 1 = 0.3
    assert pick([node("a", 0.1, inflight=3), node("b", 0.3)]).url == "http://b:1"


def test_unmeasured_node_is_assumed_average() -> None:
    # mean(0.1, 0.5) = 0.3: `new` (0.3) loses to idle `a` (0.1) ...
    assert pick([node("a", 0.1), node("b", 0.5), node("new", None)]).url == "http://a:1"
    # ... but wins once `a` is busy: a = 0.1 x 4 = 0.4 > 0.3.
    assert pick([node("a", 0.1, 3), node("b", 0.5), node("new", None)]).url == "http://new:1"


def test_nothing_measured_is_least_connections() -> None:
    assert pick([node("a", None, 1), node("b", None, 0)]).url == "http://b:1"
