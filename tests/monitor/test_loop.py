from __future__ import annotations

import dataclasses
import logging
import threading
import time
import zlib

import httpx2
import pytest
from support import StartSim, sim_stats, wait_until

from lmfleet import FleetOptions, HealthOptions, LMFleet
from lmfleet.monitor.loop import Probe, judge
from lmfleet.node.state import NodeState, NodeStatus

HEALTHY = Probe("healthy", "")
SLEEPING = Probe("sleeping", "")
DOWN = Probe("unreachable", "refused")
INIT = Probe("initializing", "")


@pytest.mark.parametrize(
    ("status", "failures", "launched", "probe", "expected"),
    [
        (NodeStatus.STARTING, 0, False, HEALTHY, NodeStatus.HEALTHY),
        (NodeStatus.STARTING, 0, False, DOWN, NodeStatus.STARTING),
        (NodeStatus.STARTING, 1, False, DOWN, NodeStatus.UNHEALTHY),
        (NodeStatus.STARTING, 5, True, DOWN, NodeStatus.STARTING),
        (NodeStatus.STARTING, 5, False, INIT, NodeStatus.STARTING),
        (NodeStatus.HEALTHY, 0, False, DOWN, NodeStatus.HEALTHY),
        (NodeStatus.HEALTHY, 1, False, DOWN, NodeStatus.UNHEALTHY),
        (NodeStatus.HEALTHY, 0, False, SLEEPING, NodeStatus.SLEEPING),
        (NodeStatus.SLEEPING, 0, False, HEALTHY, NodeStatus.HEALTHY),
        (NodeStatus.UNHEALTHY, 0, False, HEALTHY, NodeStatus.HEALTHY),
        (NodeStatus.UNHEALTHY, 0, False, DOWN, NodeStatus.UNHEALTHY),
        (NodeStatus.DRAINING, 0, False, HEALTHY, NodeStatus.DRAINING),
        (NodeStatus.STOPPED, 0, False, HEALTHY, NodeStatus.STOPPED),
    ],
)
def test_judge(
    status: NodeStatus, failures: int, launched: bool, probe: Probe, expected: NodeStatus
) -> None:
    state = NodeState(url="http://a:1", status=status, failures=failures, launched=launched)
    assert judge(state, probe, unhealthy_after=2) is expected


def test_a_hung_node_does_not_hold_back_the_others(start_sim: StartSim) -> None:
    """A round is probed from one task, but each node is settled as its answer
    arrives: a node whose `/health` never answers (probe timeout 60 s) must not
    delay what the monitor learns about the others."""
    hung, other = (
        start_sim("--health-poll-interval", "0.2"),
        start_sim("--health-poll-interval", "0.2"),
    )
    options = FleetOptions(health=HealthOptions(interval=0.1, timeout=60))
    with LMFleet.attach([hung.url, other.url], options=options) as fleet:
        fleet.wait_ready(timeout=30, min_ready=2)

        def state(url: str) -> NodeStatus:
            return {n.url: n.state for n in fleet.nodes}[url]

        httpx2.post(hung.url + "/sim/faults", json={"hang_health": True}, timeout=10)
        assert httpx2.post(other.url + "/sleep?level=1", json={}, timeout=10).status_code == 200
        wait_until(lambda: state(other.url) is NodeStatus.SLEEPING, timeout=20)
        assert state(hung.url) is NodeStatus.HEALTHY  # its probe is still waiting
        assert httpx2.post(other.url + "/wakeup", json={}, timeout=10).status_code == 200
        wait_until(lambda: state(other.url) is NodeStatus.HEALTHY, timeout=20)


def test_a_node_that_stops_answering_loses_its_load_report(start_sim: StartSim) -> None:
    """The last `/metrics` of a process that died (perhaps under load) is no load of the
    node's now: once it stops answering, the fleet forgets it, so that a restarted node
    on the same URL does not look busy until its first new report."""
    node = start_sim("--health-poll-interval", "0.2", "--fast")
    with LMFleet.attach([node.url], health_interval=0.2) as fleet:  # least_load reads /metrics
        wait_until(lambda: fleet.registry.get(node.url).load, what="a first load report")
        node.process.kill()
        wait_until(lambda: fleet.registry.get(node.url).status is NodeStatus.UNHEALTHY)
        assert fleet.registry.get(node.url).load is None


def test_a_standby_monitor_reads_metrics_only_when_the_shared_report_is_late(
    start_sim: StartSim,
) -> None:
    """A worker of `lmfleet serve --workers` hears another's reports of a node that
    worker reads (here: put into the registry as the shared state does, lmfleet/proxy/shared.py)
    and reads a node's `/metrics` itself only once the latest report is
    `STANDBY_AFTER` intervals old: while they keep coming, never; once they stop, again."""
    node = start_sim("--fast")
    with LMFleet.attach([node.url], health_interval=0.5) as fleet:  # least_load reads /metrics
        wait_until(lambda: fleet.registry.get(node.url).load, what="a first load report")
        fleet.registry.metrics_share = (1 - zlib.crc32(node.url.encode()) % 2, 2)  # not ours
        assert not fleet.registry.reads_metrics(node.url)

        def reads() -> int:
            return int(sim_stats(node.url)["by_path"].get("/metrics", 0))

        def heard(state: NodeState) -> NodeState:  # a fresh report, read by "worker 0"
            assert state.load is not None
            return state.evolve(load=dataclasses.replace(state.load, read_at=time.monotonic()))

        fleet.registry.modify(node.url, heard)
        before, until = reads(), time.monotonic() + 3.0  # 6 rounds: 6 reads of its own
        while time.monotonic() < until:
            fleet.registry.modify(node.url, heard)
            time.sleep(0.05)
        assert reads() - before <= 1  # one at most, should this thread be held up 0.75 s
        wait_until(lambda: reads() >= before + 3, 10, "reads again once the reports stopped")


def test_a_probe_that_read_a_node_before_its_sleep_does_not_wake_it_after(
    start_sim: StartSim, caplog: pytest.LogCaptureFixture
) -> None:
    """A probe of a node being put to sleep reads `/health` (which lags a sleep, as
    LMDeploy's does) and `/is_sleeping` while the node still drains, then its models
    (slow here: 1.5 s) and settles after the sleep command has let go of the node.
    What it read predates the sleep: the node stays asleep, with no flap. (The full
    suite's real-LMDeploy conformance test lost this race once on a loaded machine.)"""
    caplog.set_level(logging.INFO, logger="lmfleet")  # the status lines
    node = start_sim("--health-poll-interval", "30", "--tpot-ms", "20", "--output-tokens", "40")
    options = FleetOptions(health=HealthOptions(interval=0.1, timeout=5))
    with LMFleet.attach([node.url], options=options) as fleet:
        fleet.wait_ready(timeout=30)
        httpx2.post(node.url + "/sim/faults", json={"models_delay": 1.5}, timeout=10)
        answered = sim_stats(node.url)["models_answered"]
        client = fleet.client(max_retries=0)
        draining = threading.Thread(  # ~0.8 s of generation for the sleep to drain
            target=lambda: client.chat.completions.create(
                model=fleet.model, messages=[{"role": "user", "content": "hi"}], max_tokens=40
            )
        )
        draining.start()
        wait_until(lambda: sim_stats(node.url)["inflight"] == 1, 10, "the request on the node")
        fleet.sleep(nodes=[node.url])
        draining.join(30)
        # The probe that asked for the models during the drain has its answer now,
        # and the monitor probes a node again only once its last probe settled.
        wait_until(
            lambda: sim_stats(node.url)["models_answered"] > answered, 10, "the slow models read"
        )
        probes = sim_stats(node.url)["by_path"].get("/health", 0)
        wait_until(
            lambda: sim_stats(node.url)["by_path"].get("/health", 0) > probes,
            10,
            "the next probe (that one settled)",
        )
        assert {n.url: n.state for n in fleet.nodes}[node.url] is NodeStatus.SLEEPING
    said = [r.getMessage() for r in caplog.records]
    assert [line for line in said if "-> sleeping" in line], said
    assert not [line for line in said if "sleeping ->" in line], said
