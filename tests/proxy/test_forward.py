"""Forwarding through `fleet.serve()`: real sims, real uvicorn, real openai clients."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import httpx2
import openai
import pytest
from support import StartSim, chat, sim_served, sim_stats, wait_until

from lmfleet import LMFleet
from lmfleet.errors import ConfigError
from lmfleet.proxy import ProxyServer

Served = tuple[LMFleet, ProxyServer]
FAST = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")

MODEL = "internlm/internlm2_5-7b-chat"


def test_openai_clients_through_the_proxy(
    serve_fleet: Callable[..., Served], two_nodes: list[str]
) -> None:
    fleet, server = serve_fleet(two_nodes, strategy="round_robin")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    for i in range(10):
        reply = chat(client, MODEL, f"hello {i}", max_tokens=4)
        assert reply.choices[0].message.content
    chunks = list(chat(client, MODEL, "stream me", max_tokens=8, stream=True))
    assert len(chunks) > 2
    assert [m.id for m in client.models.list().data] == [MODEL]
    completion = client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
    assert completion.choices[0].text

    async def async_part() -> None:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(_achat, aclient, i)
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "s"}], max_tokens=6, stream=True
        )
        assert len([c async for c in stream]) > 2

    anyio.run(async_part)
    served = [sim_served(url) for url in two_nodes]
    assert sum(served) == 21 and min(served) >= 8  # round robin spread every route
    wait_until(lambda: all(n.inflight == 0 for n in fleet.nodes))


async def _achat(client: openai.AsyncOpenAI, i: int) -> None:
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"a{i}"}], max_tokens=3
    )
    assert reply.choices[0].message.content


def test_first_chunk_arrives_before_the_node_finishes_and_disconnect_frees_the_slot(
    serve_fleet: Callable[..., Served], start_sim: StartSim
) -> None:
    node = start_sim(
        "--health-poll-interval",
        "0.2",
        "--ttft-ms",
        "5",
        "--tpot-ms",
        "20",
        "--output-tokens",
        "400",
    )  # about 8 s per request: the test reads one chunk, then hangs up
    fleet, server = serve_fleet([node.url])
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "long"}],
        "max_tokens": 500,
        "stream": True,
    }
    with (
        httpx2.Client(timeout=30) as http,
        http.stream("POST", server.url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        chunks = response.iter_bytes()  # kept: a dropped generator closes the connection
        first = next(chunks)
        assert first.startswith(b"data:")
        stats = sim_stats(node.url)
        assert stats["inflight"] == 1 and stats["completed"] == 0
        assert fleet.nodes[0].inflight == 1
    # the client hung up mid-stream: the proxy closes upstream, the slot is freed
    wait_until(lambda: fleet.nodes[0].inflight == 0)
    wait_until(lambda: sim_stats(node.url)["inflight"] == 0)
    assert sim_stats(node.url)["completed"] == 0


def test_generate_and_other_routes_are_forwarded(
    serve_fleet: Callable[..., Served], two_nodes: list[str]
) -> None:
    _, server = serve_fleet(two_nodes)
    generate = httpx2.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 3})
    assert generate.status_code == 200, generate.text
    embeddings = httpx2.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert embeddings.status_code == 400  # what an LMDeploy node answers, passed through
    assert embeddings.json()["object"] == "error"


def test_port_in_use_is_a_clear_error(
    serve_fleet: Callable[..., Served], two_nodes: list[str]
) -> None:
    fleet, server = serve_fleet(two_nodes)
    with pytest.raises(ConfigError, match="in use"):
        fleet.serve(port=server.port)
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(server.url + "/health")


def test_fleet_close_stops_the_proxy(start_sim: StartSim) -> None:
    fleet = LMFleet.attach([start_sim(*FAST).url], health_interval=0.2)
    server = fleet.serve(port=0)
    assert httpx2.get(server.url + "/health").status_code in (200, 503)
    fleet.close()
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(server.url + "/health")
    server.stop()  # after close: a no-op
