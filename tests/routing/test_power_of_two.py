"""PowerOfTwo: two distinct random nodes, the less loaded wins."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.routing import PowerOfTwo, RequestInfo


def node(name: str, inflight: int = 0, latency: float | None = None) -> NodeState:
    return NodeState(
        url=f"http://{name}:1", status=NodeStatus.HEALTHY, inflight=inflight, latency=latency
    )


def test_name() -> None:
    assert PowerOfTwo.name == "power_of_two"


def test_single_node() -> None:
    only = node("a", 9)
    assert PowerOfTwo(rng=random.Random(0)).pick([only], RequestInfo()) == only


def test_two_nodes_always_compares_both() -> None:
    nodes = [node("a", 3), node("b", 1)]
    strategy = PowerOfTwo(rng=random.Random(0))
    assert {strategy.pick(nodes, RequestInfo()).url for _ in range(50)} == {"http://b:1"}  # type: ignore[union-attr]


def test_tie_on_load_goes_to_lower_latency_then_unmeasured_first() -> None:
    strategy = PowerOfTwo(rng=random.Random(0))
    pair = [node("a", 1, 0.5), node("b", 1, 0.2)]
    assert {strategy.pick(pair, RequestInfo()).url for _ in range(20)} == {"http://b:1"}  # type: ignore[union-attr]
    pair = [node("a", 1, 0.2), node("new", 1, None)]
    assert {strategy.pick(pair, RequestInfo()).url for _ in range(20)} == {"http://new:1"}  # type: ignore[union-attr]


def test_full_tie_is_a_fair_coin() -> None:
    strategy = PowerOfTwo(rng=random.Random(3))
    pair = [node("a", 1, 0.2), node("b", 1, 0.2)]
    counts = Counter(strategy.pick(pair, RequestInfo()).url for _ in range(2000))  # type: ignore[union-attr]
    assert 900 < counts["http://a:1"] < 1100


def test_most_loaded_node_never_chosen() -> None:
    nodes = [node(f"n{i}", inflight=i) for i in range(8)]
    strategy = PowerOfTwo(rng=random.Random(1))
    counts = Counter(strategy.pick(nodes, RequestInfo()).url for _ in range(2000))  # type: ignore[union-attr]
    assert "http://n7:1" not in counts
    assert counts["http://n0:1"] > counts["http://n6:1"]


@given(st.lists(st.integers(0, 9), min_size=1, max_size=20), st.integers(0, 2**32))
def test_never_the_strictly_heavier_of_two(loads: list[int], seed: int) -> None:
    nodes = [node(f"n{i}", load) for i, load in enumerate(loads)]
    chosen = PowerOfTwo(rng=random.Random(seed)).pick(nodes, RequestInfo())
    assert chosen in nodes
    # With two distinct samples, a unique maximum can never win.
    if len(nodes) > 1 and loads.count(max(loads)) == 1:
        assert chosen.inflight < max(loads)  # type: ignore[union-attr]
