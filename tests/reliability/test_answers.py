"""Nodes that are alive but failing, through both front doors, with real processes.

A black hole (every generation an instant 500, `/health` green) and a hung engine
(generations never answer, or a stream's head and then nothing) must cost the
caller nothing but a failover: outcomes come from the answers, failing nodes are
ejected, and the caller's clients have `max_retries=0` so openai cannot hide the
router. Waits are on observable state (fleet status, sim stats), never a sleep.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import anyio
import httpx2
import openai
import pytest
from loadgen import Door, Report, load_through, run_load
from support import SimNode, StartSim, chat, sim_stats, wait_until

from lmfleet import FleetOptions, ItemError, LMFleet, NodeSnapshot, NodeStatus, OutlierOptions
from lmfleet.errors import NodeUnavailableError, NoHealthyNodeError
from lmfleet.launch.process import free_port
from lmfleet.routing import STRATEGIES

FleetOver = Callable[..., tuple[LMFleet, list[SimNode]]]
BLACK_HOLE = ("--error-rate", "1", "--error-status", "500")


def load(fleet: LMFleet, door: Door, *, timeout: float = 10.0, **kwargs: object) -> Report:
    return load_through(fleet, door, timeout=timeout, **kwargs)


def state_of(fleet: LMFleet, node: SimNode) -> NodeStatus:
    return {n.url: n.state for n in fleet.nodes}[node.url]


def test_black_hole_costs_nothing_under_every_strategy(fleet_over: FleetOver, door: Door) -> None:
    first, nodes = fleet_over([(), (), BLACK_HOLE])
    first.close()  # the nodes stay; each strategy gets a fresh fleet over them
    hole = nodes[2]
    for strategy in sorted(STRATEGIES):  # a fresh fleet (no history) per strategy
        httpx2.post(hole.url + "/sim/stats/reset", timeout=5).raise_for_status()
        with LMFleet.attach(
            [n.url for n in nodes], strategy=strategy, health_interval=0.2
        ) as fleet:
            fleet.wait_ready(timeout=30, min_ready=3)
            report = load(fleet, door, total=60, concurrency=6)
            assert report.outcomes == {"ok": 60}, (strategy, report.outcomes)
            # Ejected after 5 failures in a row; requests already on their way add a few.
            received = sim_stats(hole.url)["errors_injected"]
            assert 1 <= received <= 12, (strategy, received)
            status = {n.url: n for n in fleet.nodes}[hole.url]
            assert status.state is NodeStatus.EJECTED, (strategy, status)
            assert status.errors == received and status.served == 0, (strategy, status)
            assert "failures in a row" in status.message


def test_hung_nodes_are_ejected_after_a_few_first_byte_timeouts(
    fleet_over: FleetOver, door: Door
) -> None:
    # One engine never answers, one sends a stream's head and then nothing. Round
    # robin keeps sending each its share (least-connections would starve them).
    fleet, nodes = fleet_over(
        [(), (), ("--hang",), ("--hang-after-head",)],
        first_byte_timeout=0.5,
        strategy="round_robin",
    )
    report = load(fleet, door, total=60, concurrency=4, timeout=10.0)
    assert report.outcomes == {"ok": 60}, report.outcomes
    for hung in nodes[2:]:
        assert state_of(fleet, hung) is NodeStatus.EJECTED
        assert "failures in a row" in {n.url: n for n in fleet.nodes}[hung.url].message
    # Each request waited at most a first-byte timeout or two, never the caller's 10 s.
    assert max(report.latencies) < 5.0, sorted(report.latencies)[-5:]


def test_ejection_then_probation_then_cleared(
    fleet_over: FleetOver, door: Door, caplog: pytest.LogCaptureFixture
) -> None:
    options = FleetOptions(outliers=OutlierOptions(base_ejection_time=0.5))
    fleet, nodes = fleet_over([(), BLACK_HOLE], options=options)
    hole = nodes[1]
    client = door(fleet, timeout=10.0, max_retries=0)

    def node() -> NodeSnapshot:
        return {n.url: n for n in fleet.nodes}[hole.url]

    async def send_until(done: Callable[[], bool], what: str) -> None:
        """One request at a time (each must succeed) until `done()` holds."""
        deadline = time.monotonic() + 15
        while not done():
            assert time.monotonic() < deadline, f"{what} not met"
            report = await run_load(client, fleet.model, total=1, concurrency=1)
            assert report.outcomes == {"ok": 1}, report.outcomes

    async def timeline() -> None:
        async with client:
            await send_until(lambda: node().state is NodeStatus.EJECTED, "ejected")
            table = repr(fleet)
            assert "ejected" in table and "failures in a row" in table
            await anyio.to_thread.run_sync(
                lambda: wait_until(lambda: node().state is NodeStatus.HEALTHY, what="re-admitted")
            )
            assert "probation" in node().message
            # One failure on probation: out again, for twice as long.
            await send_until(lambda: node().state is NodeStatus.EJECTED, "re-ejected")
            assert node().ejections == 2 and "ejected for 1 s" in node().message
            # The node recovers: its first success on probation clears its record.
            httpx2.post(hole.url + "/sim/faults", json={"error_rate": 0}, timeout=5)
            await anyio.to_thread.run_sync(
                lambda: wait_until(lambda: node().state is NodeStatus.HEALTHY, what="re-admitted")
            )
            await send_until(lambda: sim_stats(hole.url)["completed"] > 0, "served on probation")
            assert (node().ejections, node().state) == (0, NodeStatus.HEALTHY)

    with caplog.at_level("INFO", logger="lmfleet"):
        anyio.run(timeline)
    messages = [r.getMessage() for r in caplog.records]
    assert any(hole.url in m and "ejected for 0.5 s" in m for m in messages), messages
    assert any(hole.url in m and "re-admitted on probation" in m for m in messages), messages


def test_panic_mode_when_every_node_fails(fleet_over: FleetOver, door: Door) -> None:
    fleet, nodes = fleet_over([BLACK_HOLE, BLACK_HOLE])
    report = load(fleet, door, total=30, concurrency=3)
    # Never more than half the nodes ejected: the rest keep answering (with their
    # 500s, marked not to retry), rather than a fleet that refuses everything.
    assert report.outcomes == {"HTTP 500": 30}, report.outcomes
    states = sorted(state_of(fleet, n).value for n in nodes)
    assert states == ["ejected", "healthy"], states


def test_dead_fleet_fails_after_wait_for_node_not_a_multiple(door: Door) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with LMFleet.attach([dead], wait_for_node=1.0, health_interval=0.2) as fleet:
        client = door(fleet, timeout=30.0, max_retries=2)  # openai's default retries

        async def one() -> float:
            started = time.monotonic()
            async with client:
                with pytest.raises(openai.APIError) as caught:
                    await client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1
                    )
            error = caught.value
            if isinstance(error, openai.APIStatusError):  # through the proxy
                assert error.status_code == 503 and "no healthy node" in error.message
                assert error.response.headers["x-should-retry"] == "false"
            else:
                assert isinstance(error, NoHealthyNodeError)
                assert isinstance(error, openai.APIConnectionError)
                assert dead in str(error) and "unhealthy" in str(error)
            return time.monotonic() - started

        elapsed = anyio.run(one)
        assert 1.0 <= elapsed < 2.5, elapsed  # one wait_for_node, not three


def test_chat_many_does_not_multiply_the_wait(start_sim: StartSim) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with LMFleet.attach([dead], wait_for_node=1.0, health_interval=0.2) as fleet:
        started = time.monotonic()
        results = fleet.chat_many(
            [[{"role": "user", "content": str(i)}] for i in range(4)],
            model="m",
            retries=3,
            progress=False,
        )
        elapsed = time.monotonic() - started
    assert all(isinstance(r, ItemError) for r in results)
    errors = [r for r in results if isinstance(r, ItemError)]
    assert all(isinstance(e.error, NoHealthyNodeError) and e.attempts == 1 for e in errors)
    assert elapsed < 2.5, elapsed


def test_sync_client_fails_over_5xx_and_hung_streams(fleet_over: FleetOver) -> None:
    fleet, nodes = fleet_over([(), BLACK_HOLE, ("--hang-after-head",)], first_byte_timeout=0.5)
    client = fleet.client(max_retries=0, timeout=10)
    for i in range(12):
        if i % 2:
            assert chat(client, fleet.model, f"plain {i}", max_tokens=4).choices
        else:
            chunks = list(chat(client, fleet.model, f"stream {i}", max_tokens=4, stream=True))
            assert chunks
    assert sim_stats(nodes[0].url)["completed"] == 12
    bad = [n for n in fleet.nodes if n.url != nodes[0].url]
    assert all(n.errors > 0 and n.served == 0 for n in bad), bad
    # Both fail, but at most half of three nodes may be out at once.
    assert sorted(n.state.value for n in bad) == ["ejected", "healthy"], bad


def test_ejection_is_visible_everywhere(fleet_over: FleetOver) -> None:
    fleet, nodes = fleet_over([(), BLACK_HOLE])
    hole = nodes[1]
    client = fleet.client(max_retries=0)
    wait_until(
        lambda: (
            chat(client, fleet.model, "q", max_tokens=2).choices
            and state_of(fleet, hole) is NodeStatus.EJECTED
        ),
        what="ejected",
    )
    server = fleet.serve(port=0)
    try:
        status = httpx2.get(server.url + "/nodes/status", timeout=5).json()[hole.url]
        assert status["state"] == "ejected" and status["ejections"] == 1
        assert status["error_rate"] == 1.0 and status["errors"] >= 5 and status["served"] == 0
        assert "failures in a row" in status["message"]
        metrics = httpx2.get(server.url + "/metrics", timeout=5).text
        assert f'lmfleet_node_ejections{{node="{hole.url}"}} 1.0' in metrics
        assert f'lmfleet_node_error_rate{{node="{hole.url}"}} 1.0' in metrics
        assert f'lmfleet_node_state{{node="{hole.url}",state="ejected"}} 1.0' in metrics
    finally:
        server.stop()
    html = fleet._repr_html_()
    assert "ejected" in html and re.search(r">(\d+)/\1<", html)  # recent errors: all failed


def test_every_attempt_failing_names_each_node_and_reason(
    fleet_over: FleetOver, door: Door
) -> None:
    fleet, nodes = fleet_over([("--hang",), ("--hang-after-head",)], first_byte_timeout=0.3)
    client = door(fleet, timeout=10.0, max_retries=0)

    async def one() -> openai.APIError:
        async with client:
            with pytest.raises(openai.APIError) as caught:
                await client.chat.completions.create(
                    model=fleet.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
                )
        return caught.value

    error = anyio.run(one)
    if isinstance(error, openai.APIStatusError):  # through the proxy
        assert error.status_code == 502 and error.response.headers["x-should-retry"] == "false"
        text = error.message
    else:
        assert isinstance(error, NodeUnavailableError), error
        text = str(error)
    assert "3 attempt(s) failed" in text, text
    for node in nodes:
        assert f"{node.url} sent no first byte within 0.3 s" in text, text
