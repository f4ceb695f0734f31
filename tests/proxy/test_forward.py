"""Forwarding through `fleet.serve()`: real sims, real uvicorn, real openai clients."""

from __future__ import annotations

import json
import socket
import time
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
    with fleet.serve(port=0) as block:  # a `with` block stops it at its end
        assert httpx2.get(block.url + "/health").status_code == 200
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(block.url + "/health")


def test_fleet_close_stops_the_proxy(start_sim: StartSim) -> None:
    fleet = LMFleet.attach([start_sim(*FAST).url], health_interval=0.2)
    server = fleet.serve(port=0)
    assert httpx2.get(server.url + "/health").status_code in (200, 503)
    fleet.close()
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(server.url + "/health")
    server.stop()  # after close: a no-op


def _steady(probe: Callable[[], int], quiet: float = 1.0, timeout: float = 30.0) -> int:
    """`probe`'s value once it has not changed for `quiet` seconds (polled)."""
    last: list[tuple[int, float]] = []  # (value, since when it was seen)

    def settled(value: int) -> bool:
        now = time.monotonic()
        if not last or last[0][0] != value:
            last[:] = [(value, now)]
        return now - last[0][1] >= quiet

    return wait_until(probe, timeout, "the node's generation to stop", until=settled, step=0.05)


def test_a_caller_that_stops_reading_holds_its_node_back_and_one_that_leaves_frees_it(
    serve_fleet: Callable[..., Served], start_sim: StartSim
) -> None:
    """Backpressure end to end: a caller that reads nothing more of a long stream stops
    the node's generation within a few MB (the proxy waits for the caller's socket
    before reading the node further, and stops reading the node past HIGH_WATER), not
    after the whole answer sat in the proxy's memory; the caller then hangs up and the
    node's generation is aborted."""
    tokens = 200_000  # ~40 MB of events: the kernel's buffers and ours hold a few MB
    node = start_sim("--ttft-ms", "1", "--tpot-ms", "0.01", "--output-tokens", str(tokens)).url
    _, server = serve_fleet([node])
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "stream": True}
    ).encode()
    with socket.socket() as caller:
        caller.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        caller.settimeout(10)
        caller.connect((host, int(port)))
        caller.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
        )
        assert caller.recv(1024).startswith(b"HTTP/1.1 200 ")  # then reads nothing more
        generated = _steady(lambda: int(sim_stats(node)["generated_tokens"]))
        assert generated < tokens // 2, "the node was read on while the caller read nothing"
    stats = wait_until(lambda: sim_stats(node), until=lambda s: s["inflight"] == 0)
    assert stats["aborted"] == 1 and stats["generated_tokens"] < tokens // 2
