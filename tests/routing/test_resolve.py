"""resolve_strategy: names, LMDeploy aliases, pass-through, clear errors."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

import lmfleet.routing as routing
from lmfleet.errors import ConfigError
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.routing import (
    STRATEGIES,
    LeastConnections,
    LeastLoad,
    MinExpectedLatency,
    MinObservedLatency,
    PlainStrategy,
    PowerOfTwo,
    PrefixAffinity,
    RandomStrategy,
    RequestInfo,
    RoundRobin,
    Strategy,
    resolve_strategy,
)

EXPECTED = {
    "random": RandomStrategy,
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
    "least_load": LeastLoad,
    "min_observed_latency": MinObservedLatency,
    "min_expected_latency": MinExpectedLatency,
    "power_of_two": PowerOfTwo,
    "prefix_affinity": PrefixAffinity,
}


def test_registry_lists_every_strategy() -> None:
    assert dict.fromkeys(STRATEGIES) == dict.fromkeys(EXPECTED)
    for name, cls in EXPECTED.items():
        assert cls.name == name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_name_builds_a_working_strategy(name: str) -> None:
    strategy = resolve_strategy(name, rng=random.Random(0))
    assert type(strategy) is EXPECTED[name]
    assert isinstance(strategy, Strategy)
    nodes = [NodeState(url=f"http://n{i}:1", status=NodeStatus.HEALTHY) for i in range(3)]
    assert strategy.pick(nodes, RequestInfo(affinity_key="k")) in nodes


@pytest.mark.parametrize(
    ("spelling", "cls"),
    [
        ("Round-Robin", RoundRobin),
        ("LEAST_CONNECTIONS", LeastConnections),
        (" power-of-two ", PowerOfTwo),
        ("MIN_EXPECTED_LATENCY", MinExpectedLatency),  # LMDeploy's enum member names
        ("RoutingStrategy.MIN_OBSERVED_LATENCY", MinObservedLatency),
        ("RANDOM", RandomStrategy),
    ],
)
def test_spellings(spelling: str, cls: type) -> None:
    assert type(resolve_strategy(spelling)) is cls


def test_fresh_instance_each_time() -> None:
    assert resolve_strategy("round_robin") is not resolve_strategy("round_robin")


def test_seeded_rng_is_used() -> None:
    nodes = [NodeState(url=f"http://n{i}:1", status=NodeStatus.HEALTHY) for i in range(10)]
    a = resolve_strategy("random", rng=random.Random(3))
    b = resolve_strategy("random", rng=random.Random(3))
    assert [a.pick(nodes, RequestInfo()) for _ in range(20)] == [
        b.pick(nodes, RequestInfo()) for _ in range(20)
    ]


def test_custom_object_is_adapted() -> None:
    class First:
        def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
            return nodes[0]

    custom = First()
    strategy = resolve_strategy(custom)
    assert isinstance(strategy, PlainStrategy) and strategy.wrapped is custom
    nodes = [NodeState(url=f"http://n{i}:1", status=NodeStatus.HEALTHY) for i in range(3)]
    assert strategy.pick(nodes, RequestInfo()) is nodes[0]


def test_base_strategy_passes_through() -> None:
    custom = RoundRobin()
    assert resolve_strategy(custom) is custom


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"least_connections.*round_robin") as info:
        resolve_strategy("fastest")
    assert "fastest" in str(info.value)


def test_not_a_strategy() -> None:
    with pytest.raises(ConfigError, match="pick"):
        resolve_strategy(42)  # type: ignore[arg-type]


def test_public_exports() -> None:
    names = ["Strategy", "RequestInfo", "resolve_strategy", "STRATEGIES", "affinity_key"]
    names += ["BaseStrategy", "PlainStrategy", "CAPABILITIES", "as_base_strategy"]
    names += ["uses_node_load", "wants_affinity_key", "explain_pick"]
    for name in names:
        assert name in routing.__all__
