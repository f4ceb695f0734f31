"""lmfleet against real LMDeploy api_servers (stub engine): the suites that matter most.

Two peers register themselves with `fleet.serve()` through `--proxy-url` (before
their ports open), then: routing over both, sleep/wakeup while `/health` lags by
LMDeploy's default 12 s, and failover when a node dies.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from conformance.peer_support import API_KEY, Server, start_peer
from support import wait_until

from lmfleet import LMFleet
from lmfleet.launch.process import wait_for_port
from lmfleet.node.state import NodeStatus


@dataclass
class RealFleet:
    fleet: LMFleet
    proxy_url: str
    peers: list[Server]
    model: str


def states(fleet: LMFleet) -> dict[str, NodeStatus]:
    return {n.url: n.state for n in fleet.nodes}


def served(fleet: LMFleet) -> dict[str, int]:
    return {n.url: n.served for n in fleet.nodes}


@pytest.fixture(scope="module")
def real_fleet(peer_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealFleet]:
    logs = tmp_path_factory.mktemp("fleet-logs")
    fleet = LMFleet.attach(
        [],
        allow_empty=True,
        api_key=API_KEY,
        health_interval=0.3,
        wait_for_node=10,
        strategy="least_connections",  # a woken node must rejoin the rotation
    )
    server = fleet.serve(port=0)
    peers: list[Server] = []
    try:
        # poll_interval=None: LMDeploy's default 12 s /health lag, as in production.
        peers = [
            start_peer(
                peer_model,
                logs,
                "--api-keys",
                API_KEY,
                "--proxy-url",
                server.url,
                poll_interval=None,
                wait=False,
            )
            for _ in range(2)
        ]
        for peer in peers:
            wait_for_port("127.0.0.1", peer.port, timeout=120, proc=peer.process)
        wait_until(
            lambda: sorted(states(fleet).get(p.url) for p in peers) == [NodeStatus.HEALTHY] * 2,
            30,
            "both self-registered peers healthy",
        )
        yield RealFleet(fleet, server.url, peers, str(peer_model))
    finally:
        fleet.close()
        for peer in peers:
            peer.stop()


def ask(client: openai.OpenAI, model: str, n: int = 8) -> list[str]:
    reasons = []
    for _ in range(n):
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        reasons.append(out.choices[0].finish_reason)
    return reasons


def test_registration_and_routing_over_real_nodes(real_fleet: RealFleet) -> None:
    fleet = real_fleet.fleet
    assert set(states(fleet)) == {p.url for p in real_fleet.peers}
    assert fleet.model == real_fleet.model
    before = served(fleet)
    assert ask(fleet.client(), fleet.model) == ["length"] * 8
    after = served(fleet)
    assert all(after[p.url] > before.get(p.url, 0) for p in real_fleet.peers), after
    # the HTTP front door (no key: the proxy itself has none) routes the same way
    proxy = openai.OpenAI(base_url=real_fleet.proxy_url + "/v1", api_key="unused", max_retries=0)
    assert ask(proxy, fleet.model, 2) == ["length"] * 2


def test_sleep_and_wakeup_while_health_lags(real_fleet: RealFleet) -> None:
    fleet = real_fleet.fleet
    sleeper, other = (p.url for p in real_fleet.peers)
    fleet.sleep(nodes=[sleeper])
    assert states(fleet)[sleeper] is NodeStatus.SLEEPING
    # LMDeploy's /health still says "healthy" for up to 12 s: the fleet must not
    # put the node back into rotation from it (monitor polls every 0.3 s here).
    before = served(fleet)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert ask(fleet.client(), fleet.model, 1) == ["length"]
        assert states(fleet)[sleeper] is NodeStatus.SLEEPING
    after = served(fleet)
    assert after[sleeper] == before[sleeper] and after[other] > before[other]
    fleet.wakeup(nodes=[sleeper])
    assert states(fleet)[sleeper] is NodeStatus.HEALTHY
    before = served(fleet)
    ask(fleet.client(), fleet.model, 6)
    assert served(fleet)[sleeper] > before[sleeper]


def test_failover_when_a_real_node_dies(real_fleet: RealFleet) -> None:
    fleet = real_fleet.fleet
    victim, survivor = real_fleet.peers
    victim.process.kill()
    assert ask(fleet.client(), fleet.model, 6) == ["length"] * 6
    wait_until(lambda: states(fleet)[victim.url] is NodeStatus.UNHEALTHY, 10, "victim unhealthy")
    assert states(fleet)[survivor.url] is NodeStatus.HEALTHY
