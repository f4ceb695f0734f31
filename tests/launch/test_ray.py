"""The Ray launcher on a real local Ray cluster (num_gpus=0, simulator command).

One cluster for the whole module: Ray takes seconds to start on two cores.
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` keeps Ray's node address on 127.0.0.1
(otherwise Ray swaps a loopback `_node_ip_address` for an interface address),
so node URLs, which come from Ray's own node address, stay on loopback.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from launch.helpers import FAST, alive, all_dead
from support import wait_until

from lmfleet import LMFleet, NodeStatus

_RAY_DAEMONS = ("raylet", "gcs_server")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    previous = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = pytest.importorskip("ray")
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=8,
        num_gpus=0,
        log_to_driver=False,
    )
    daemons = [
        p.pid
        for p in psutil.Process().children(recursive=True)
        if any(name in p.name() for name in _RAY_DAEMONS)
    ]
    try:
        yield ray
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = previous
        assert daemons and all_dead(daemons, timeout=15), "Ray daemons left running"


def _chat(fleet: LMFleet) -> str:
    reply = fleet.client().chat.completions.create(
        model=fleet.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    return str(reply.choices[0].message.content)


def test_ray_nodes_serve_log_and_stop(ray_cluster: Any) -> None:
    fleet = LMFleet.simulate(
        nodes=2,
        launcher="ray",
        sim_args=(*FAST, "--log-level", "info"),
        health_interval=0.2,
        weight_updates=True,
    )
    with fleet:
        fleet.wait_ready(timeout=60)
        for url, node in fleet.processes.items():  # the actor's command line, seen here
            assert node.argv[node.argv.index("--port") + 1] == url.rsplit(":", 1)[1]
            assert "--distributed-executor-backend" in node.argv
        assert fleet.update_weights("w", version=1).ok  # preflight read those flags
        urls = sorted(n.url for n in fleet.nodes)
        assert all(url.startswith("http://127.0.0.1:") for url in urls)
        assert len(set(urls)) == 2
        for _ in range(4):
            assert _chat(fleet)
        assert sum(n.served for n in fleet.nodes) == 4
        wait_until(lambda: urls[0].rsplit(":", 1)[1] in fleet.logs(urls[0]), timeout=10)
        pids = [node.pid for node in fleet.processes.values()]
        actors = [node.actor for node in fleet.processes.values()]  # type: ignore[attr-defined]
        assert all(pid is not None and alive(pid) for pid in pids)
    assert all_dead([p for p in pids if p is not None], timeout=10)
    for actor in actors:
        with pytest.raises(ray_cluster.exceptions.RayActorError):
            ray_cluster.get(actor.info.remote(), timeout=10)


def test_ray_node_comes_back_after_its_server_or_its_actor_dies(ray_cluster: Any) -> None:
    fleet = LMFleet.simulate(
        nodes=1,
        launcher="ray",
        sim_args=FAST,
        restart="on-failure",
        max_restarts=2,
        health_interval=0.2,
    )
    with fleet:
        fleet.wait_ready(timeout=60)
        ((url, node),) = fleet.processes.items()
        first_pid = node.pid
        assert first_pid is not None

        # The server dies inside a live actor: the actor restarts it on the same port.
        os.kill(first_pid, signal.SIGKILL)
        wait_until(lambda: fleet.nodes[0].state is not NodeStatus.HEALTHY, timeout=10, step=0.01)
        wait_until(lambda: fleet.nodes[0].state is NodeStatus.HEALTHY, timeout=30)
        assert fleet.nodes[0].url == url
        assert node.pid != first_pid
        assert _chat(fleet)

        # The actor itself is killed: Ray restarts it, its server goes with it
        # (PR_SET_PDEATHSIG), and the fleet follows the node's (maybe new) URL.
        second_pid = node.pid
        assert second_pid is not None
        ray_cluster.kill(node.actor, no_restart=False)  # type: ignore[attr-defined]
        assert all_dead([second_pid], timeout=10)
        wait_until(lambda: node.pid not in (first_pid, second_pid), timeout=40)
        wait_until(
            lambda: len(fleet.nodes) == 1 and fleet.nodes[0].state is NodeStatus.HEALTHY,
            timeout=40,
        )
        assert set(fleet.processes) == {fleet.nodes[0].url}
        assert _chat(fleet)
        last_pid = node.pid
    assert last_pid is not None and all_dead([last_pid], timeout=10)


def test_ray_actor_killed_without_restart_stays_unhealthy(ray_cluster: Any) -> None:
    with LMFleet.simulate(nodes=1, launcher="ray", sim_args=FAST, health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=60)
        node = next(iter(fleet.processes.values()))
        ray_cluster.kill(node.actor, no_restart=False)  # type: ignore[attr-defined]
        wait_until(lambda: fleet.nodes[0].state is NodeStatus.UNHEALTHY, timeout=20)
        assert node.pid is not None and all_dead([node.pid], timeout=10)
