"""RandomStrategy: uniform, reproducible with a seeded RNG."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.routing import RandomStrategy, RequestInfo


def node(i: int, inflight: int = 0) -> NodeState:
    return NodeState(
        url=f"http://n{i}:1", status=NodeStatus.HEALTHY, models=("m",), inflight=inflight
    )


def test_name() -> None:
    assert RandomStrategy.name == "random"


def test_seeded_rng_is_reproducible() -> None:
    nodes = [node(i) for i in range(5)]
    first = [RandomStrategy(rng=random.Random(7)).pick(nodes, RequestInfo()) for _ in range(3)]
    a = RandomStrategy(rng=random.Random(7))
    b = RandomStrategy(rng=random.Random(7))
    picks_a = [a.pick(nodes, RequestInfo()) for _ in range(50)]
    picks_b = [b.pick(nodes, RequestInfo()) for _ in range(50)]
    assert picks_a == picks_b
    assert first[0] == picks_a[0]


def test_roughly_uniform_and_ignores_load() -> None:
    nodes = [node(0, inflight=100), node(1), node(2)]
    strategy = RandomStrategy(rng=random.Random(1))
    counts = Counter(strategy.pick(nodes, RequestInfo()).url for _ in range(3000))  # type: ignore[union-attr]
    assert set(counts) == {n.url for n in nodes}
    assert all(900 < c < 1100 for c in counts.values())


@given(st.lists(st.integers(0, 50), min_size=1, max_size=20), st.integers(0, 2**32))
def test_pick_is_a_member(loads: list[int], seed: int) -> None:
    nodes = [node(i, load) for i, load in enumerate(loads)]
    assert RandomStrategy(rng=random.Random(seed)).pick(nodes, RequestInfo()) in nodes
