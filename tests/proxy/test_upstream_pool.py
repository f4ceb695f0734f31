"""The proxy's upstream pool under real uvicorn: `max_connections` caps what a node sees."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx2
from support import StartSim, sim_stats

from lmfleet import LMFleet
from lmfleet.config import FleetOptions, RoutingOptions
from lmfleet.proxy import ProxyServer

Served = tuple[LMFleet, ProxyServer]


def test_six_requests_share_two_upstream_connections(
    start_sim: StartSim, serve_fleet: Callable[..., Served]
) -> None:
    """Six concurrent requests (streamed and not) to a slow node through a proxy capped
    at two connections: the node never has more than two requests at once (one per
    HTTP/1.1 connection), the other four wait in the proxy, and all six complete."""
    node = start_sim("--ttft-ms", "150", "--tpot-ms", "10", "--health-poll-interval", "0.2")
    options = FleetOptions(routing=RoutingOptions(max_connections=2))
    fleet, server = serve_fleet([node.url], options=options)

    async def burst() -> list[httpx2.Response]:
        async with httpx2.AsyncClient(base_url=server.url, timeout=60) as http:
            return await asyncio.gather(
                *[
                    http.post(
                        "/v1/chat/completions",
                        json={
                            "model": fleet.model,
                            "messages": [{"role": "user", "content": f"q{i}"}],
                            "stream": i % 2 == 0,
                        },
                    )
                    for i in range(6)
                ]
            )

    replies = asyncio.run(burst())
    assert [r.status_code for r in replies] == [200] * 6
    assert all(r.text.rstrip().endswith("data: [DONE]") for r in replies[::2])
    assert all(r.json()["choices"][0]["message"]["content"] for r in replies[1::2])
    stats = sim_stats(node.url)
    assert stats["completed"] == 6
    assert stats["max_inflight"] == 2  # the cap was reached and never passed
    assert all(n.inflight == 0 and n.errors == 0 for n in fleet.nodes)


def test_a_full_pool_is_a_503_with_retry_after(
    start_sim: StartSim, serve_fleet: Callable[..., Served]
) -> None:
    """One connection, held by a slow stream; the next request waits `upstream_timeout`
    for it and gets a 503 saying the proxy is full (not a 504 blaming the node), and
    the node is not charged with an error."""
    node = start_sim("--ttft-ms", "2", "--tpot-ms", "200", "--health-poll-interval", "0.2")
    options = FleetOptions(routing=RoutingOptions(max_connections=1))
    fleet, server = serve_fleet([node.url], options=options, serve={"upstream_timeout": 0.5})
    body = {"model": fleet.model, "messages": [{"role": "user", "content": "q"}]}
    streamed = {**body, "stream": True}
    with (
        httpx2.Client(base_url=server.url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=streamed) as slow,
    ):
        assert slow.status_code == 200
        full = http.post("/v1/chat/completions", json=body)
        slow.read()
    assert full.status_code == 503, full.text
    assert "upstream connection limit" in full.json()["message"]
    assert full.headers["retry-after"] == "1"
    assert all(n.errors == 0 for n in fleet.nodes)
