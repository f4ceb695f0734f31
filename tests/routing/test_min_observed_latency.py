"""MinObservedLatency: lowest latency x (inflight + 1), optimistic prior for new nodes."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.routing import MinObservedLatency, RequestInfo


def node(name: str, latency: float | None, inflight: int = 0) -> NodeState:
    return NodeState(
        url=f"http://{name}:1", status=NodeStatus.HEALTHY, inflight=inflight, latency=latency
    )


def pick(nodes: list[NodeState], seed: int = 0) -> NodeState:
    chosen = MinObservedLatency(rng=random.Random(seed)).pick(nodes, RequestInfo())
    assert chosen is not None
    return chosen


def test_name() -> None:
    assert MinObservedLatency.name == "min_observed_latency"


def test_fastest_idle_node_wins() -> None:
    assert pick([node("a", 0.5), node("b", 0.2), node("c", 0.3)]).url == "http://b:1"


def test_load_spreads_off_the_fastest_node() -> None:
    # 0.2 x (2 + 1) = 0.6 > 0.5 x (0 + 1): the slower idle node wins.
    assert pick([node("a", 0.5), node("b", 0.2, inflight=2)]).url == "http://a:1"
    # 0.2 x 2 = 0.4 < 0.5: the fast node keeps it with one in flight.
    assert pick([node("a", 0.5), node("b", 0.2, inflight=1)]).url == "http://b:1"


def test_new_node_gets_traffic() -> None:
    """LMDeploy scores an unmeasured node as infinitely slow; here it ties the best."""
    nodes = [node("a", 0.5), node("b", 0.2), node("new", None)]
    counts = Counter(pick(nodes, seed).url for seed in range(200))
    assert set(counts) == {"http://b:1", "http://new:1"}
    assert 70 < counts["http://new:1"] < 130


def test_new_node_burst_is_still_spread_by_inflight() -> None:
    # A prior of 0 would send this burst to `new` forever; the min prior does not.
    assert pick([node("a", 0.2), node("new", None, inflight=1)]).url == "http://a:1"


def test_nothing_measured_is_least_connections() -> None:
    nodes = [node("a", None, 2), node("b", None, 1), node("c", None, 3)]
    assert pick(nodes).url == "http://b:1"


def test_ties_are_random_but_seeded() -> None:
    nodes = [node("a", 0.3), node("b", 0.3)]
    assert {pick(nodes, seed).url for seed in range(20)} == {"http://a:1", "http://b:1"}
    assert pick(nodes, 5) == pick(nodes, 5)


@given(
    st.lists(
        st.tuples(st.none() | st.floats(0.001, 10.0), st.integers(0, 20)), min_size=1, max_size=20
    ),
    st.integers(0, 1000),
)
def test_pick_minimises_the_score(specs: list[tuple[float | None, int]], seed: int) -> None:
    nodes = [node(f"n{i}", lat, load) for i, (lat, load) in enumerate(specs)]
    chosen = pick(nodes, seed)
    measured = [lat for lat, _ in specs if lat is not None]
    prior = min(measured) if measured else 1.0

    def score(n: NodeState) -> float:
        return (prior if n.latency is None else n.latency) * (n.inflight + 1)

    assert chosen in nodes
    assert score(chosen) == min(score(n) for n in nodes)
