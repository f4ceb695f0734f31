"""Outcomes and outlier ejection in the registry: the rules, without any I/O."""

from __future__ import annotations

import logging

import pytest
from support import wait_until

from lmfleet.config import OutlierOptions
from lmfleet.node.outliers import Outcome, outcome_of_status
from lmfleet.node.state import NodeStatus
from lmfleet.registry import NodeRegistry
from lmfleet.routing import resolve_strategy
from lmfleet.routing.base import RequestInfo

ANY = RequestInfo()


def fleet_registry(*urls: str, **options: object) -> NodeRegistry:
    registry = NodeRegistry(OutlierOptions(**options))  # type: ignore[arg-type]
    for url in urls:
        registry.add(url)
        registry.modify(url, lambda s: s.evolve(status=NodeStatus.HEALTHY))
    return registry


def status_of(registry: NodeRegistry, url: str) -> NodeStatus:
    """What a reader of the fleet sees (a read re-admits nodes whose time is up)."""
    return {n.url: n.status for n in registry.snapshot()}[url]


def answer(registry: NodeRegistry, url: str, outcome: Outcome, times: int = 1) -> None:
    for _ in range(times):
        registry.modify(url, lambda s: s.evolve(inflight=s.inflight + 1))
        registry.release(url, outcome, latency=0.1 if outcome is Outcome.SUCCESS else None)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.SUCCESS),
        (204, Outcome.SUCCESS),
        (400, Outcome.NEUTRAL),
        (404, Outcome.NEUTRAL),
        (429, Outcome.NEUTRAL),
        (500, Outcome.FAILURE),
        (503, Outcome.FAILURE),
    ],
)
def test_outcome_of_status(status: int, outcome: Outcome) -> None:
    assert outcome_of_status(status) is outcome


def test_consecutive_failures_eject_and_a_success_resets_the_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = fleet_registry("http://a:1", "http://b:1", "http://c:1")
    answer(registry, "http://a:1", Outcome.FAILURE, 4)
    answer(registry, "http://a:1", Outcome.SUCCESS)
    answer(registry, "http://a:1", Outcome.NEUTRAL, 10)  # 4xx: the caller's fault
    answer(registry, "http://a:1", Outcome.FAILURE, 4)
    state = registry.get("http://a:1")
    assert state.status is NodeStatus.HEALTHY and state.streak == 4
    assert (state.served, state.errors) == (1, 8)
    with caplog.at_level(logging.WARNING, logger="lmfleet"):
        answer(registry, "http://a:1", Outcome.FAILURE)
    state = registry.get("http://a:1")
    assert state.status is NodeStatus.EJECTED and state.ejections == 1
    assert "5 failures in a row" in state.message and "30 s" in state.message
    assert any(
        "http://a:1" in r.getMessage() and "ejected" in r.getMessage() for r in caplog.records
    )
    strategy = resolve_strategy("round_robin")
    picks = {registry.lease(strategy, ANY).url for _ in range(20)}  # type: ignore[union-attr]
    assert picks == {"http://b:1", "http://c:1"}


def test_error_rate_over_the_window_ejects() -> None:
    registry = fleet_registry(
        "http://a:1", "http://b:1", consecutive_failures=100, window=10, min_requests=10
    )
    for _ in range(5):
        answer(registry, "http://a:1", Outcome.SUCCESS)
        answer(registry, "http://a:1", Outcome.FAILURE)
    state = registry.get("http://a:1")
    assert state.status is NodeStatus.EJECTED, state
    assert "error rate 50%" in state.message


def test_never_more_than_max_ejection_percent() -> None:
    registry = fleet_registry("http://a:1", "http://b:1", "http://c:1")
    for url in ("http://a:1", "http://b:1", "http://c:1"):
        answer(registry, url, Outcome.FAILURE, 10)
    statuses = sorted(n.status.value for n in registry.snapshot())
    assert statuses == ["ejected", "healthy", "healthy"]  # floor(3 x 50 %) = 1
    alone = fleet_registry("http://a:1")
    answer(alone, "http://a:1", Outcome.FAILURE, 50)
    assert alone.get("http://a:1").status is NodeStatus.HEALTHY  # one node: never ejected


def test_panic_mode_routes_to_ejected_nodes_when_none_is_healthy() -> None:
    registry = fleet_registry("http://a:1", "http://b:1")
    answer(registry, "http://a:1", Outcome.FAILURE, 5)
    assert registry.get("http://a:1").status is NodeStatus.EJECTED
    registry.modify("http://b:1", lambda s: s.evolve(status=NodeStatus.UNHEALTHY))
    leased = registry.lease(resolve_strategy("least_connections"), ANY)
    assert leased is not None and leased.url == "http://a:1"
    assert registry.panics == 1


def test_readmitted_on_probation_then_ejected_longer_or_cleared(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = fleet_registry("http://a:1", "http://b:1", base_ejection_time=0.2)
    answer(registry, "http://a:1", Outcome.FAILURE, 5)
    first = registry.get("http://a:1")
    assert first.status is NodeStatus.EJECTED and "0.2 s" in first.message
    with caplog.at_level(logging.INFO, logger="lmfleet"):  # re-admitted (and logged) on a read
        wait_until(lambda: status_of(registry, "http://a:1") is NodeStatus.HEALTHY, timeout=5)
    again = registry.get("http://a:1")
    assert again.probation and "re-admitted on probation" in again.message
    assert any("re-admitted" in r.getMessage() for r in caplog.records)
    answer(registry, "http://a:1", Outcome.FAILURE)  # one failure on probation: out again
    second = registry.get("http://a:1")
    assert second.status is NodeStatus.EJECTED and second.ejections == 2
    assert "0.4 s" in second.message and "probation" in second.message
    wait_until(lambda: status_of(registry, "http://a:1") is NodeStatus.HEALTHY, timeout=5)
    answer(registry, "http://a:1", Outcome.SUCCESS)  # a success on probation clears the record
    cleared = registry.get("http://a:1")
    assert (cleared.ejections, cleared.probation, cleared.streak) == (0, False, 0)


def test_ejection_time_is_capped() -> None:
    registry = fleet_registry(
        "http://a:1", "http://b:1", base_ejection_time=0.05, max_ejection_time=0.1
    )
    answer(registry, "http://a:1", Outcome.FAILURE, 5)
    for _ in range(3):
        wait_until(lambda: status_of(registry, "http://a:1") is NodeStatus.HEALTHY, timeout=5)
        answer(registry, "http://a:1", Outcome.FAILURE)
    state = registry.get("http://a:1")
    assert state.ejections == 4 and "0.1 s" in state.message


def test_one_key_per_node_whatever_the_spelling() -> None:
    registry = NodeRegistry()
    registry.add("127.0.0.1:9")
    for spelling in ("127.0.0.1:9", "http://127.0.0.1:9/", "http://127.0.0.1:9/v1"):
        assert registry.get(spelling).url == "http://127.0.0.1:9"
        assert registry.modify(spelling, lambda s: s) is not None
    registry.hold("127.0.0.1:9")
    assert registry.is_held("http://127.0.0.1:9")
    assert registry.remove("127.0.0.1:9").url == "http://127.0.0.1:9"
    assert registry.snapshot() == []
