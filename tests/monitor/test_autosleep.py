"""Idle auto-sleep (lmfleet/monitor/autosleep.py): idle nodes sleep, busy ones do not, and a
request to a fleet that is all asleep wakes one. Real `lmfleet sim` processes."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
from support import StartSim, chat, sim_stats, wait_until

from lmfleet import LMFleet, NodeStatus
from lmfleet.config import FleetOptions, HealthOptions
from lmfleet.monitor.autosleep import check_interval, idle_nodes
from lmfleet.node.outliers import Outcome
from lmfleet.registry import NodeRegistry
from lmfleet.routing import resolve_strategy
from lmfleet.routing.base import RequestInfo

FAST = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")
SLOW_STREAM = (*FAST[:4], "--tpot-ms", "10", "--output-tokens", "200")  # a 2 s answer
AFTER = 0.5
"""Seconds of idleness before a node sleeps, in these tests."""


def states(fleet: LMFleet) -> dict[str, NodeStatus]:
    return {n.url: n.state for n in fleet.nodes}


def asleep(url: str) -> bool:
    """The node's own word: every tag asleep."""
    return bool(sim_stats(url)["sleeping"])


def test_idle_nodes_counts_from_the_last_lease_release_or_return_to_health() -> None:
    registry = NodeRegistry()
    url = registry.add("http://127.0.0.1:1", models=("m",)).url
    registry.modify(url, lambda s: s.evolve(status=NodeStatus.HEALTHY))
    healthy_at = registry.last_active(url)
    assert healthy_at is not None
    assert idle_nodes(registry, 10, healthy_at + 9) == []
    assert idle_nodes(registry, 10, healthy_at + 10) == [(url, 10)]

    node = registry.lease(resolve_strategy("least_connections"), RequestInfo())
    assert node is not None
    leased_at = registry.last_active(url)
    assert leased_at is not None and leased_at >= healthy_at
    assert idle_nodes(registry, 10, leased_at + 60) == []  # a request in flight
    registry.release(url, Outcome.SUCCESS, latency=0.1)
    released_at = registry.last_active(url)
    assert released_at is not None and released_at >= leased_at
    assert idle_nodes(registry, 10, released_at + 9) == []
    assert [u for u, _ in idle_nodes(registry, 10, released_at + 10)] == [url]

    registry.hold(url)  # an admin command runs on it
    assert idle_nodes(registry, 10, released_at + 60) == []
    registry.unhold(url)
    registry.modify(url, lambda s: s.evolve(status=NodeStatus.SLEEPING))
    assert idle_nodes(registry, 10, released_at + 60) == []  # only healthy nodes
    registry.modify(url, lambda s: s.evolve(status=NodeStatus.HEALTHY))  # woken
    woken_at = registry.last_active(url)
    assert woken_at is not None and woken_at > released_at
    registry.remove(url)
    assert registry.last_active(url) is None


def test_check_interval_is_a_quarter_of_the_idle_time_within_bounds() -> None:
    assert check_interval(2.0) == 0.5
    assert check_interval(600.0) == 1.0
    assert check_interval(0.01) == 0.05


def test_idle_node_sleeps_and_busy_node_does_not(
    start_sim: StartSim, caplog: pytest.LogCaptureFixture
) -> None:
    """One long stream keeps its node busy past `auto_sleep_after`; the other node,
    idle, is put to sleep meanwhile; the busy one sleeps once its stream has ended."""
    caplog.set_level(logging.INFO, logger="lmfleet")
    urls = [start_sim(*SLOW_STREAM).url for _ in range(2)]
    fleet = LMFleet.attach(
        urls, strategy="least_connections", health_interval=0.2, auto_sleep_after=AFTER
    )
    with fleet:
        fleet.wait_ready(timeout=30, min_ready=1)
        client = fleet.client(max_retries=0)
        stream = chat(client, fleet.model, "keep me busy", stream=True, max_tokens=300)
        chunks = iter(stream)
        next(chunks)  # the answer has started: its node holds the lease
        (busy,) = [n.url for n in fleet.nodes if n.inflight == 1]
        (idle,) = [url for url in urls if url != busy]
        wait_until(lambda: asleep(idle), timeout=20, what=f"{idle} asleep")
        wait_until(lambda: states(fleet)[idle] is NodeStatus.SLEEPING, timeout=10)

        started = time.monotonic()
        finish = None
        for chunk in chunks:  # about 2 s of tokens, several times `auto_sleep_after`
            assert states(fleet)[busy] is NodeStatus.HEALTHY
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
        assert finish is not None  # the answer ended normally: never cut by a sleep
        assert time.monotonic() - started > 2 * AFTER
        assert sim_stats(busy)["aborted"] == 0

        wait_until(lambda: asleep(busy), timeout=20, what=f"{busy} asleep once idle")
        wait_until(lambda: states(fleet)[busy] is NodeStatus.SLEEPING, timeout=10)
    lines = [r.getMessage() for r in caplog.records if "putting it to sleep" in r.getMessage()]
    assert any(line.startswith(f"node {idle} idle for ") for line in lines), lines
    assert any(line.startswith(f"node {busy} idle for ") for line in lines), lines


def test_request_to_a_fleet_all_asleep_wakes_one_node(start_sim: StartSim) -> None:
    """Auto-sleep given in `options` (not the shortcut, so `wake_on_demand` is off)
    still wakes a node on demand; the woken node goes back to sleep when idle."""
    urls = [start_sim(*FAST).url for _ in range(2)]
    options = FleetOptions(health=HealthOptions(interval=0.2), auto_sleep_after=AFTER)
    assert not options.routing.wake_on_demand
    with LMFleet.attach(urls, options=options) as fleet:
        fleet.wait_ready(timeout=30, min_ready=1)
        model = fleet.model
        wait_until(lambda: all(asleep(url) for url in urls), timeout=20, what="all asleep")
        wait_until(lambda: set(states(fleet).values()) == {NodeStatus.SLEEPING}, timeout=10)

        reply = chat(fleet.client(max_retries=0), model, "wake up", max_tokens=2)
        assert reply.choices[0].message.content
        (woken,) = [url for url in urls if sim_stats(url)["completed"] == 1]
        assert fleet.registry.waiting == 0
        wait_until(lambda: asleep(woken), timeout=20, what=f"{woken} asleep again")


def test_a_request_that_came_while_the_node_was_going_to_sleep_still_wakes_it(
    start_sim: StartSim,
) -> None:
    """The wake-up a request asks for finds no node it may wake (the only one is held,
    as while auto-sleep drains it); the request asks again while it waits, and is
    served once the hold ends rather than failing after `wait_for_node`."""
    url = start_sim(*FAST).url
    with LMFleet.attach([url], health_interval=0.2, wake_on_demand=True) as fleet:
        fleet.wait_ready(timeout=30)
        model = fleet.model
        fleet.sleep()
        fleet.registry.hold(url)
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(chat, fleet.client(max_retries=0), model, "hi", max_tokens=2)
            wait_until(lambda: fleet.registry.waiting, timeout=10, until=lambda n: n == 1)
            assert asleep(url)  # nothing was woken: the node is held
            fleet.registry.unhold(url)
            assert reply.result(timeout=20).choices[0].message.content
        assert fleet.registry.waiting == 0


def test_a_node_that_cannot_wake_does_not_keep_the_others_asleep(
    start_sim: StartSim, caplog: pytest.LogCaptureFixture
) -> None:
    """Wake-on-demand tries the first sleeper; it cannot wake (its `/wakeup` fails).
    The request asks again while it waits, and the next try is another sleeper:
    served. The failure is logged, and the broken node is not counted as able to
    serve (what the proxy's probes report) until `WAKE_RETRY_AFTER` has passed."""
    caplog.set_level(logging.WARNING, logger="lmfleet")
    broken, good = (start_sim(*FAST).url for _ in range(2))
    with LMFleet.attach(
        [broken, good], health_interval=0.2, wake_on_demand=True, wait_for_node=20
    ) as fleet:
        fleet.wait_ready(timeout=30, min_ready=2)
        fleet.sleep()
        assert fleet.admin.wakes(RequestInfo()) == 2
        assert [s.url for s in fleet.admin.wakeable(RequestInfo())] == [broken, good]
        faults = httpx2.post(broken + "/sim/faults", json={"wakeup_error": 500}, timeout=5)
        assert faults.status_code == 200

        reply = chat(fleet.client(max_retries=0), fleet.model, "wake up", max_tokens=2)
        assert reply.choices[0].message.content
        assert sim_stats(good)["completed"] == 1 and asleep(broken)
        assert sim_stats(broken)["errors_injected"] >= 1  # it was tried first
        assert f"wake on demand: {broken} did not wake" in caplog.text
        assert fleet.admin.wakes(RequestInfo()) == 0  # the good one is awake now
