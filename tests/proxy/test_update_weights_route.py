"""`POST /fleet/update_weights`: the one-call weight update over HTTP, admin keys only."""

from __future__ import annotations

from collections.abc import Callable

import httpx2
from conftest import Served
from support import LOADS_WEIGHTS, StartSim, sim_stats

from lmfleet.proxy import ProxyOptions

RAY = LOADS_WEIGHTS
FAST = ("--health-poll-interval", "0.2", "--fast")


def test_update_weights_route(start_sim: StartSim, serve_fleet: Callable[..., Served]) -> None:
    urls = [start_sim(*FAST, *RAY).url for _ in range(2)]
    fleet, server = serve_fleet(
        urls, serve={"options": ProxyOptions(api_keys=("client",), admin_keys=("admin",))}
    )
    admin = {"Authorization": "Bearer admin"}
    route = server.url + "/fleet/update_weights"
    body = {"version": 7, "payload": ["b0", "b1"], "rolling": 1}

    assert httpx2.post(
        route, json=body, headers={"Authorization": "Bearer client"}
    ).status_code in (401, 403)
    answer = httpx2.post(route, json=body, headers=admin, timeout=60)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["version"] == 7 and sorted(result["updated"]) == sorted(urls)
    assert result["failed"] == {}
    assert all(sim_stats(u)["weights"]["updates"] == 1 for u in urls)
    status = httpx2.get(server.url + "/nodes/status", headers=admin).json()
    assert {node["weight_version"] for node in status.values()} == {7}
    chat = httpx2.post(
        server.url + "/v1/chat/completions",
        json={"model": fleet.model, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": "Bearer client"},
        timeout=30,
    )
    assert chat.status_code == 200 and chat.headers["x-lmfleet-weight-version"] == "7"
    metrics = httpx2.get(server.url + "/metrics", headers=admin).text
    assert f'lmfleet_node_weight_version{{node="{urls[0]}"}} 7.0' in metrics

    for bad, why in (
        ({"payload": "x"}, "version"),
        ({"version": 8}, "payload"),
        ({"version": 8, "payload": "x", "rolling": "two"}, "rolling"),
        ({"version": 8, "payload": "x", "rolling": 0}, "rolling must be"),
        ({"version": 8, "payload": "x", "level": 7}, "sleep level"),
        ({"version": 8, "payload": {}}, f"no bodies for {urls[0]}"),
        ({"version": 8, "payload": [1]}, "a weight-update body is"),
        ({"version": 8, "payload": []}, "gave no bodies"),
    ):
        answer = httpx2.post(route, json=bad, headers=admin, timeout=60)
        assert answer.status_code == 400 and why in answer.json()["message"], answer.text
    # Refused before any node was touched: none asleep, none quarantined, none pushed.
    status = httpx2.get(server.url + "/nodes/status", headers=admin).json()
    assert [(n["state"], n["quarantine"]) for n in status.values()] == [("healthy", "")] * 2
    assert all(sim_stats(u)["weights"]["updates"] == 1 for u in urls)


def test_update_weights_route_names_the_missing_flag(
    start_sim: StartSim, serve_fleet: Callable[..., Served]
) -> None:
    url = start_sim(*FAST, "--backend", "pytorch").url
    _, server = serve_fleet([url])
    answer = httpx2.post(
        server.url + "/fleet/update_weights", json={"version": 1, "payload": "x"}, timeout=60
    )
    assert answer.status_code == 501
    assert "--distributed-executor-backend ray" in answer.json()["message"]
