"""LMDeploy's `/nodes/*` (self-registration included), `/fleet/*`, and the state file."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import httpx2
import openai
import pytest
from support import StartSim, chat, sim_served, sim_stats, wait_until

from lmfleet import LMFleet, NodeStatus
from lmfleet.proxy import ProxyServer

Served = tuple[LMFleet, ProxyServer]
FAST = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")
MODEL = "internlm/internlm2_5-7b-chat"


def _healthy(fleet: LMFleet) -> int:
    return sum(1 for n in fleet.nodes if n.state is NodeStatus.HEALTHY)


def test_self_registration_remove_and_validation(
    serve_fleet: Callable[..., Served], start_sim: StartSim
) -> None:
    fleet, server = serve_fleet([])
    joined = start_sim(*FAST, "--proxy-url", server.url, "--startup-delay", "0.3", wait=False)
    wait_until(lambda: _healthy(fleet) == 1)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    for i in range(3):
        chat(client, MODEL, f"r{i}", max_tokens=2)
    assert sim_served(joined.url) == 3
    status = httpx2.get(server.url + "/nodes/status").json()
    entry = status[joined.url]
    assert entry["models"] == [MODEL] and entry["role"] == 1 and entry["unfinished"] == 0
    assert entry["state"] == "healthy"

    other = start_sim(*FAST)
    added = httpx2.post(server.url + "/nodes/add", json={"url": other.url})
    assert added.json() == {"message": "Added successfully", "url": other.url}
    wait_until(lambda: _healthy(fleet) == 2)
    removed = httpx2.post(server.url + "/nodes/remove", json={"url": joined.url})
    assert removed.json() == {"message": "Removed successfully", "url": joined.url}
    for i in range(3):
        chat(client, MODEL, f"s{i}", max_tokens=2)
    assert sim_served(joined.url) == 3 and sim_served(other.url) == 3

    for bad in (
        "ftp://x:1",
        "http://",
        "not a url at all/",
        server.url,
        f"http://localhost:{server.port}",
    ):
        response = httpx2.post(server.url + "/nodes/add", json={"url": bad})
        assert response.status_code == 400, bad
    assert httpx2.post(server.url + "/nodes/add", content=b"{").status_code == 400
    missing = httpx2.post(server.url + "/nodes/remove", json={"url": "http://127.0.0.1:1"})
    assert missing.status_code == 404 and missing.json()["object"] == "error"


def test_terminate_and_terminate_all(
    serve_fleet: Callable[..., Served], start_sim: StartSim
) -> None:
    nodes = [start_sim(*FAST, "--allow-terminate-by-client") for _ in range(3)]
    fleet, server = serve_fleet([n.url for n in nodes])
    done = httpx2.post(server.url + "/nodes/terminate", json={"url": nodes[0].url}, timeout=20)
    assert done.json() == {"message": "Terminated successfully", "url": nodes[0].url}
    wait_until(lambda: nodes[0].process.returncode is not None)
    assert nodes[0].url not in [n.url for n in fleet.nodes]
    everything = httpx2.get(server.url + "/nodes/terminate_all", timeout=20)
    assert everything.json() == {"message": "All nodes terminated successfully"}
    wait_until(lambda: all(n.process.returncode is not None for n in nodes))
    assert fleet.nodes == []


def test_fleet_admin_routes(serve_fleet: Callable[..., Served], start_sim: StartSim) -> None:
    nodes = [start_sim(*FAST) for _ in range(2)]
    fleet, server = serve_fleet([n.url for n in nodes])
    url = server.url
    first = nodes[0].url
    slept = httpx2.post(url + "/fleet/sleep", params={"level": 1, "node": first}, timeout=30)
    assert slept.status_code == 200, slept.text
    assert {n.url: n.state for n in fleet.nodes}[first] is NodeStatus.SLEEPING
    assert sim_stats(first)["sleeping"] is True
    status = httpx2.get(url + "/fleet/status").json()
    assert {n["url"]: n["state"] for n in status["nodes"]}[first] == "sleeping"
    assert httpx2.post(url + "/fleet/sleep", params={"level": 3}).status_code == 400
    woke = httpx2.post(url + "/fleet/wakeup", timeout=30)
    assert woke.status_code == 200, woke.text
    wait_until(lambda: _healthy(fleet) == 2)
    drained = httpx2.post(url + "/fleet/drain", json={"url": first, "timeout": 5}, timeout=30)
    assert drained.json() == {"url": first, "drained": True}
    assert {n.url: n.state for n in fleet.nodes}[first] is NodeStatus.STOPPED
    unknown = httpx2.post(url + "/fleet/drain", json={"url": "http://127.0.0.1:1"})
    assert unknown.status_code == 404


def test_state_file_survives_a_restart(start_sim: StartSim, tmp_path: Path) -> None:
    state = tmp_path / "nodes.json"
    node = start_sim(*FAST)
    fleet = LMFleet.attach([], allow_empty=True, health_interval=0.2)
    try:
        server = fleet.serve(port=0, state_file=state)
        status = {"role": 1, "speed": 2.5, "priority": 50}
        httpx2.post(server.url + "/nodes/add", json={"url": node.url, "status": status})
        saved = json.loads(state.read_text())  # written before /nodes/add answered
        assert saved["kind"] == "lmfleet serve node list"
        entry = {"url": node.url, "role": 1, "models": [], "speed": 2.5, "priority": 50}
        assert saved["nodes"] == [{**entry, "weight_version": 0, "key": None}]
        # What the fleet learns by itself reaches the file too: the models the node
        # reports, and a weight version (as a weight update records it).
        wait_until(lambda: _healthy(fleet) == 1)
        fleet.registry.modify(node.url, lambda s: s.evolve(weight_version=4))
        wait_until(
            lambda: json.loads(state.read_text())["nodes"][0],
            until=lambda kept: kept["models"] == [MODEL] and kept["weight_version"] == 4,
        )
    finally:
        fleet.close()
    again = LMFleet.attach([], allow_empty=True, health_interval=0.2)
    try:
        server = again.serve(port=0, state_file=state)
        wait_until(lambda: _healthy(again) == 1)
        assert again.nodes[0].speed == 2.5  # the speed LMDeploy's registration gave
        assert again.nodes[0].priority == 50
        assert again.nodes[0].weight_version == 4
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        assert chat(client, MODEL, "back", max_tokens=2).choices[0].message.content
        httpx2.post(server.url + "/nodes/remove", json={"url": node.url})
        assert json.loads(state.read_text())["nodes"] == []
    finally:
        again.close()


def test_a_state_file_reload_leaves_a_sleeping_node_asleep(
    start_sim: StartSim, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`lmfleet serve --node URL` over a state file that lists URL too (every restart):
    the reload re-adds a node the flags added and the monitor found asleep. It stays
    asleep, with no `sleeping -> starting` flap, and wake-on-demand can still wake it."""
    caplog.set_level(logging.INFO, logger="lmfleet")  # the status lines
    node = start_sim(*FAST)
    state = tmp_path / "nodes.json"
    entry = {"url": node.url, "role": 1, "models": [MODEL], "weight_version": 0, "key": None}
    listed = {"kind": "lmfleet serve node list", "version": 2, "nodes": [entry]}
    state.write_text(json.dumps(listed))
    with LMFleet.attach([node.url], health_interval=0.2, wake_on_demand=True) as fleet:
        fleet.wait_ready(timeout=30)
        fleet.sleep()
        assert fleet.nodes[0].state is NodeStatus.SLEEPING
        server = fleet.serve(port=0, state_file=state)
        assert fleet.nodes[0].state is NodeStatus.SLEEPING
        assert not [r for r in caplog.records if "-> starting" in r.getMessage()]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        assert chat(client, MODEL, "wake", max_tokens=2).choices[0].message.content
        assert sim_served(node.url) == 1


def test_a_registered_speed_is_kept_shown_and_checked(serve_fleet: Callable[..., Served]) -> None:
    """LMDeploy's `/nodes/add` carries `status.speed`: kept, shown, and a bad one refused."""
    fleet, server = serve_fleet([])
    url = "http://127.0.0.1:9"  # never answers: only the registration matters here
    added = httpx2.post(server.url + "/nodes/add", json={"url": url, "status": {"speed": 30}})
    assert added.status_code == 200
    assert httpx2.get(server.url + "/nodes/status").json()[url]["speed"] == 30
    again = httpx2.post(server.url + "/nodes/add", json={"url": url})
    assert again.status_code == 200
    assert fleet.nodes[0].speed == 30  # re-registering without a speed keeps it
    for bad in (0, -1, "fast", True, float("inf")):
        body = json.dumps({"url": url, "status": {"speed": bad}}).encode()
        refused = httpx2.post(server.url + "/nodes/add", content=body)
        assert refused.status_code == 400, bad
        assert "status.speed" in refused.json()["message"]


def test_a_registered_priority_is_kept_shown_and_checked(
    serve_fleet: Callable[..., Served],
) -> None:
    """`/nodes/add`'s `status.priority` puts the node in its tier: shown in
    `/nodes/status` and `/metrics`, kept by a re-registration without one, and a
    priority that is not an integer refused."""
    fleet, server = serve_fleet([])
    url = "http://127.0.0.1:9"  # never answers: only the registration matters here
    added = httpx2.post(server.url + "/nodes/add", json={"url": url, "status": {"priority": 50}})
    assert added.status_code == 200
    assert httpx2.get(server.url + "/nodes/status").json()[url]["priority"] == 50
    metrics = httpx2.get(server.url + "/metrics").text
    assert f'lmfleet_node_priority{{node="{url}"}} 50.0' in metrics
    assert 'lmfleet_tier_spills_total{reason="load"} 0.0' in metrics
    httpx2.post(server.url + "/nodes/add", json={"url": url})
    assert fleet.nodes[0].priority == 50
    for bad in ("high", True, 1.5):
        body = json.dumps({"url": url, "status": {"priority": bad}}).encode()
        refused = httpx2.post(server.url + "/nodes/add", content=body)
        assert refused.status_code == 400, bad
        assert "status.priority" in refused.json()["message"]
