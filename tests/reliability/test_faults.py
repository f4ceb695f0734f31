"""Fault scenarios through both front doors (routed client and proxy), real processes.

Each asserts its expected outcome: nothing is lost (no hang past its bound, no
unclear failure), requests that had not started succeed elsewhere while another
node is healthy, in-flight counters return to zero.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import httpx2
import pytest
from loadgen import Door, Report, run_load
from support import SimNode, StartSim, kill_mid_stream, sim_stats, wait_until, wait_until_async

from lmfleet import LMFleet, NodeStatus

FleetOver = Callable[..., tuple[LMFleet, list[SimNode]]]
SLOWER = ("--output-tokens", "60")  # streams of ~0.2 s: long enough to be cut mid-way


def settle(fleet: LMFleet) -> None:
    """In-flight counts reach zero once every response has been closed."""
    wait_until(
        lambda: [n.inflight for n in fleet.nodes],
        10,
        "every in-flight count back to zero",
        until=lambda counts: not any(counts),
    )


def load(
    fleet: LMFleet, door: Door, *, timeout: float = 10.0, max_retries: int = 2, **kwargs: object
) -> Report:
    client = door(fleet, timeout=timeout, max_retries=max_retries)

    async def main() -> Report:
        async with client:
            return await run_load(client, fleet.model, **kwargs)  # type: ignore[arg-type]

    return anyio.run(main)


def test_sigkill_under_load(fleet_over: FleetOver, door: Door, start_sim: StartSim) -> None:
    fleet, nodes = fleet_over([SLOWER, SLOWER, SLOWER])

    async def kill() -> None:
        await kill_mid_stream(nodes[0])

    report = load(fleet, door, total=120, concurrency=24, max_tokens=60, during=kill)
    assert report.lost == 0, report.outcomes
    failed = {k for k in report.outcomes if k != "ok"}
    assert failed <= {
        "StreamInterruptedError",  # the routed client
        "error event (bad_gateway)",  # the proxy: the stream ends with an error event
    }, report.outcomes
    assert report.ok >= 100, report.outcomes  # every non-streamed request succeeds elsewhere
    settle(fleet)


def test_hanging_node_never_holds_a_request_past_its_timeout(
    fleet_over: FleetOver, door: Door
) -> None:
    fleet, _nodes = fleet_over([(), (), ("--hang",)])
    started = time.monotonic()
    report = load(fleet, door, total=60, concurrency=12, timeout=1.0, max_retries=1, bound=5.0)
    assert report.lost == 0, report.outcomes
    assert set(report.outcomes) <= {"ok", "APITimeoutError(ReadTimeout)", "HTTP 504"}, (
        report.outcomes
    )
    assert report.ok >= 30, report.outcomes
    assert max(report.latencies) < 3.5  # two attempts of 1 s each, plus slack
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("status", [503, 500])
def test_node_answering_errors_at_random(fleet_over: FleetOver, door: Door, status: int) -> None:
    fleet, _nodes = fleet_over([(), (), ("--error-rate", "0.5", "--error-status", str(status))])
    report = load(fleet, door, total=90, concurrency=9, max_retries=0)
    assert report.lost == 0, report.outcomes
    # Turned away before any byte reached the caller: the router sends it elsewhere.
    assert report.outcomes == {"ok": 90}
    settle(fleet)


def test_node_dropping_streams_midway(fleet_over: FleetOver, door: Door) -> None:
    fleet, _nodes = fleet_over([SLOWER, SLOWER, (*SLOWER, "--drop-stream-after", "3")])
    report = load(fleet, door, total=60, concurrency=12, max_tokens=60, max_retries=0)
    assert report.lost == 0, report.outcomes
    cut = report.sent - report.ok
    assert cut > 0, "some streams went to the dropping node"
    assert set(report.outcomes) - {"ok"} <= {
        "StreamInterruptedError",  # the routed client
        "error event (bad_gateway)",  # the proxy: the stream ends with an error event
    }, report.outcomes
    assert report.ok >= 30  # every non-streamed request and streams elsewhere
    settle(fleet)


def test_slow_to_start_node_joins_when_ready(
    fleet_over: FleetOver, door: Door, start_sim: StartSim
) -> None:
    fleet, _nodes = fleet_over([(), ()])
    late = start_sim("--health-poll-interval", "0.2", "--startup-delay", "1.5", wait=False)
    fleet.add_node(late.url)
    report = load(fleet, door, total=40, concurrency=8)
    assert report.outcomes == {"ok": 40}
    wait_until(
        lambda: {n.url: n.state for n in fleet.nodes}[late.url],
        what="the late node to join",
        until=lambda state: state is NodeStatus.HEALTHY,
    )
    report = load(fleet, door, total=30, concurrency=6)
    assert report.outcomes == {"ok": 30}
    assert sim_stats(late.url)["completed"] > 0


def test_flapping_node(fleet_over: FleetOver, door: Door) -> None:
    fleet, nodes = fleet_over([(), (), ()])
    flapper = nodes[2].url
    stop = threading.Event()

    def flap() -> None:
        bad = True
        while not stop.is_set():
            fault = "unhealthy" if bad else None
            httpx2.post(flapper + "/sim/faults", json={"health_fault": fault}, timeout=5)
            bad = not bad
            stop.wait(0.3)  # the flapping period (emulated behaviour, not a wait)

    thread = threading.Thread(target=flap)
    thread.start()
    try:
        report = load(fleet, door, total=90, concurrency=9)
    finally:
        stop.set()
        thread.join()
    assert report.outcomes == {"ok": 90}
    settle(fleet)


def test_sleep_and_wake_while_traffic_flows(fleet_over: FleetOver, door: Door) -> None:
    fleet, nodes = fleet_over([(), (), ()])
    sleeper = nodes[0].url
    others = [n.url for n in nodes[1:]]
    during_sleep: list[int] = []

    def completed(urls: list[str]) -> int:
        return sum(int(sim_stats(url)["completed"]) for url in urls)

    async def cycle() -> None:
        await wait_until_async(  # traffic flows, the sleeper included
            lambda: anyio.to_thread.run_sync(completed, [sleeper]), what="the sleeper serving"
        )
        await anyio.to_thread.run_sync(lambda: fleet.sleep(nodes=[sleeper]))
        before, elsewhere = await anyio.to_thread.run_sync(
            lambda: (completed([sleeper]), completed(others))
        )
        await wait_until_async(  # traffic goes on around the sleeping node
            lambda: anyio.to_thread.run_sync(completed, others),
            what="30 requests served elsewhere while it sleeps",
            until=lambda served: served >= elsewhere + 30,
        )
        during_sleep.append(await anyio.to_thread.run_sync(completed, [sleeper]) - before)
        await anyio.to_thread.run_sync(lambda: fleet.wakeup(nodes=[sleeper]))

    report = load(fleet, door, total=150, concurrency=9, during=cycle)
    assert report.outcomes == {"ok": 150}
    assert during_sleep == [0]
    settle(fleet)
