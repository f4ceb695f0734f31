"""BaseStrategy: declared capabilities, the default explain, plain objects adapted, typos caught."""

from __future__ import annotations

import copy
import pickle
import random
from collections.abc import Sequence

import pytest

from lmfleet.errors import ConfigError
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.routing import (
    CAPABILITIES,
    STRATEGIES,
    BaseStrategy,
    Candidate,
    LeastLoad,
    PlainStrategy,
    PrefixAffinity,
    RequestInfo,
    RoundRobin,
    Strategy,
    as_base_strategy,
    explain_pick,
    resolve_strategy,
    uses_node_load,
    wants_affinity_key,
)

NODES = [NodeState(url=f"http://n{i}:1", status=NodeStatus.HEALTHY, inflight=i) for i in range(3)]

NEEDS = {
    "least_load": {"uses_node_load"},
    "prefix_affinity": {"uses_node_load", "uses_affinity_key"},
}
"""The built-ins that need anything fetched for them; every other one needs nothing."""


class First:
    """A user's own strategy: only `pick`, no base class."""

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        return nodes[0]


def test_capabilities_are_the_base_class_attributes() -> None:
    assert {"uses_node_load", "uses_affinity_key"} == CAPABILITIES
    for capability in CAPABILITIES:
        assert getattr(BaseStrategy, capability) is False


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_builtin_inherits_the_base_and_declares_what_it_needs(name: str) -> None:
    strategy = resolve_strategy(name, rng=random.Random(0))
    assert isinstance(strategy, BaseStrategy)
    assert isinstance(strategy, Strategy)
    assert as_base_strategy(strategy) is strategy
    assert strategy.name == name
    declared = {c for c in CAPABILITIES if getattr(strategy, c)}
    assert declared == NEEDS.get(name, set())
    assert uses_node_load(strategy) is strategy.uses_node_load
    assert wants_affinity_key(strategy) is strategy.uses_affinity_key


def test_default_explain_lists_in_flight_counts() -> None:
    explained = RoundRobin().explain(NODES, RequestInfo())
    assert explained == [
        Candidate(n.url, None, f"{n.inflight} of our requests in flight") for n in NODES
    ]
    decision = explain_pick(RoundRobin(), NODES, RequestInfo(), note="n")
    assert decision.strategy == "round_robin"
    assert decision.chosen == "http://n0:1"
    assert list(decision.candidates) == explained
    assert decision.note == "n"
    assert explain_pick(RoundRobin(), [], RequestInfo()).candidates == ()


def test_an_override_replaces_the_default_explain() -> None:
    explained = LeastLoad(clock=lambda: 0.0).explain(NODES, RequestInfo())
    assert [c.score for c in explained] == [1.0, 2.0, 3.0]


def test_subclass_declares_by_class_attribute() -> None:
    class Sticky(BaseStrategy):
        name = "sticky"
        uses_affinity_key = True

        def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
            return nodes[-1]

    strategy = Sticky()
    assert (strategy.name, strategy.uses_affinity_key, strategy.uses_node_load) == (
        "sticky",
        True,
        False,
    )
    assert wants_affinity_key(strategy) and not uses_node_load(strategy)
    assert resolve_strategy(strategy) is strategy
    assert explain_pick(strategy, NODES, RequestInfo()).chosen == "http://n2:1"


def test_name_defaults_to_the_class_name_unless_inherited() -> None:
    class Mine(BaseStrategy):
        def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
            return nodes[0]

    class Yours(Mine):
        pass

    class FasterLoad(LeastLoad):
        pass

    assert (Mine.name, Yours.name) == ("Mine", "Yours")
    assert FasterLoad.name == "least_load"  # declared by LeastLoad, inherited as any attribute
    assert FasterLoad.uses_node_load is True


def test_pick_is_the_one_abstract_method() -> None:
    assert BaseStrategy.__abstractmethods__ == frozenset({"pick"})

    class NoPick(BaseStrategy):
        pass

    with pytest.raises(TypeError, match="pick"):
        NoPick()  # type: ignore[abstract]


@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        ("uses_node_lod", r"NoPick\.uses_node_lod is not a strategy capability.*'uses_node_load'"),
        ("uses_affinity", r"'uses_affinity_key'"),
        ("use_node_load", r"use_node_load is not a strategy capability"),
        ("wants_affinity_key", r"did you mean 'uses_affinity_key'"),
        ("needs_metrics", r"needs_metrics is not a strategy capability"),
    ],
)
def test_a_misspelt_capability_fails_the_class_definition(attribute: str, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        type("NoPick", (BaseStrategy,), {attribute: True})


def test_a_capability_must_be_a_bool_and_a_name_a_string() -> None:
    with pytest.raises(TypeError, match=r"uses_node_load must be True or False, got 'yes'"):

        class Loaded(RoundRobin):
            uses_node_load = "yes"  # type: ignore[assignment]

    with pytest.raises(TypeError, match="name must be a non-empty string"):

        class Nameless(RoundRobin):
            name = ""


def test_other_attributes_are_left_alone() -> None:
    class Tuned(RoundRobin):
        load_factor = 2.0
        vnodes = 10

    assert Tuned.name == "round_robin"


def test_plain_object_is_adapted() -> None:
    custom = First()
    strategy = resolve_strategy(custom)
    assert isinstance(strategy, PlainStrategy)
    assert strategy.wrapped is custom
    assert (strategy.name, strategy.uses_node_load, strategy.uses_affinity_key) == (
        "First",
        False,
        False,
    )
    assert strategy.pick(NODES, RequestInfo()) is NODES[0]
    assert strategy.explain(NODES, RequestInfo()) == RoundRobin().explain(NODES, RequestInfo())
    assert not uses_node_load(custom) and not wants_affinity_key(custom)
    assert explain_pick(custom, NODES, RequestInfo()).strategy == "First"
    assert repr(strategy).startswith("PlainStrategy(<")


def test_plain_object_keeps_what_it_declares() -> None:
    class Keyed(First):
        name = "keyed"
        uses_affinity_key = True

        def __init__(self) -> None:
            self.uses_node_load = True  # per object, as the attribute readers allowed

        def explain(self, nodes: Sequence[NodeState], request: RequestInfo) -> list[Candidate]:
            return [Candidate(n.url, 0.0, "mine") for n in nodes]

    strategy = as_base_strategy(Keyed())
    assert (strategy.name, strategy.uses_node_load, strategy.uses_affinity_key) == (
        "keyed",
        True,
        True,
    )
    assert PlainStrategy.uses_affinity_key is False  # the object's, not the adapter class's
    assert wants_affinity_key(Keyed()) and uses_node_load(Keyed())
    decision = explain_pick(Keyed(), NODES, RequestInfo())
    assert decision.strategy == "keyed"
    assert [c.why for c in decision.candidates] == ["mine"] * 3


def test_plain_object_with_a_misspelt_capability_is_refused() -> None:
    class Typo(First):
        uses_afinity_key = True

    with pytest.raises(ConfigError, match=r"Typo\.uses_afinity_key.*'uses_affinity_key'"):
        resolve_strategy(Typo())
    with pytest.raises(TypeError, match="uses_afinity_key"):
        as_base_strategy(Typo())


def test_adapted_object_copies_and_pickles() -> None:
    strategy = resolve_strategy(RoundRobinLike())
    assert isinstance(strategy, PlainStrategy)
    twin = copy.deepcopy(strategy)
    assert isinstance(twin, PlainStrategy) and twin.wrapped is not strategy.wrapped
    assert twin.name == "round_robin_like"
    restored = pickle.loads(pickle.dumps(strategy))
    assert isinstance(restored, PlainStrategy) and restored.name == "round_robin_like"
    assert restored.pick(NODES, RequestInfo()) is not None


class RoundRobinLike:
    """Module level, so that pickle finds it."""

    name = "round_robin_like"

    def __init__(self) -> None:
        self.turn = 0

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        self.turn += 1
        return nodes[self.turn % len(nodes)]


def test_prefix_affinity_declares_both() -> None:
    assert PrefixAffinity.uses_affinity_key and PrefixAffinity.uses_node_load
