"""Request priority in the registry: who waits for a full node, and who goes first."""

from __future__ import annotations

import time

import pytest

from lmfleet.priority import AGING_SECONDS, effective, parse_priority, rank
from lmfleet.registry import QUEUE_HEADROOM, NodeRegistry
from lmfleet.routing import resolve_strategy
from lmfleet.routing.base import RequestInfo

URL = "http://n:1"


def full_node(capacity: float = 2) -> NodeRegistry:
    registry = NodeRegistry()
    registry.add(URL, models=("m",))
    registry.modify(URL, lambda s: s.evolve(status=s.status.HEALTHY, capacity=capacity))
    return registry


def lease(registry: NodeRegistry, priority: int, **kwargs: object) -> bool:
    strategy = resolve_strategy("least_connections")
    request = RequestInfo(priority=priority)
    return registry.lease(strategy, request, **kwargs) is not None  # type: ignore[arg-type]


def test_rank_orders_by_priority_then_arrival_and_ages() -> None:
    assert rank(5, 100.0) < rank(0, 100.0) < rank(0, 100.1) < rank(-1, 100.0)
    # One level is worth AGING_SECONDS of waiting.
    assert rank(-1, 100.0) == pytest.approx(rank(0, 100.0 + AGING_SECONDS))
    assert effective(-2, 0.0, 2 * AGING_SECONDS) == pytest.approx(0.0)
    assert parse_priority(b"-3", "h") == -3
    for bad in ("high", 1.5, True, None):
        with pytest.raises(ValueError, match="integer priority"):
            parse_priority(bad, "h")


def test_a_background_request_waits_for_room_in_a_full_node() -> None:
    registry = full_node(capacity=2)
    assert all(lease(registry, -1) for _ in range(2 + QUEUE_HEADROOM))  # 2 run, 2 queue
    assert not lease(registry, -1)  # full: it waits in the fleet
    assert registry.held_back == 1
    assert lease(registry, 0)  # the default priority goes to the node's own queue
    # Aged past 0 (one level per AGING_SECONDS waited), it is no longer held back.
    assert lease(registry, -1, since=time.monotonic() - AGING_SECONDS - 1)


def test_a_node_of_unknown_capacity_is_never_full() -> None:
    registry = NodeRegistry()
    registry.add(URL, models=("m",))
    registry.modify(URL, lambda s: s.evolve(status=s.status.HEALTHY))
    assert all(lease(registry, -5) for _ in range(20))


def test_a_waiting_request_lets_a_higher_priority_go_first() -> None:
    registry = NodeRegistry()
    registry.add(URL, models=("m",))
    registry.modify(URL, lambda s: s.evolve(status=s.status.HEALTHY))
    now = time.monotonic()
    high = registry.enter_queue(10, RequestInfo(priority=3), now)
    low = registry.enter_queue(10, RequestInfo(priority=0), now - 1)
    assert not lease(registry, 0, ticket=low, since=now - 1)  # behind the higher one
    assert not lease(registry, 1)  # a newcomer below it waits too
    assert lease(registry, 3, ticket=high, since=now)
    registry.leave_queue(high)
    assert lease(registry, 0, ticket=low, since=now - 1)
    registry.leave_queue(low)
    assert registry.waiting == 0
