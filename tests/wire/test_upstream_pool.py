"""`max_connections` is a real cap: Http11Transport (the proxy's) and the clients' pools.

Scripted servers on loopback count the connections they accept and hold each answer
until the test lets it go, so "never more than N open" is read off the node's side,
and the waits are on observable state (queued requests, accepted connections).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import pytest
from support import StartSim, sim_stats, wait_until_async

from lmfleet import LMFleet, NodeStatus
from lmfleet.config import FleetOptions, RoutingOptions
from lmfleet.priority import PRIORITY
from lmfleet.transport import AsyncFleetTransport
from lmfleet.wire.upstream import Http11Transport

pytestmark = pytest.mark.anyio

CHAT: dict[str, Any] = {
    "model": "internlm/internlm2_5-7b-chat",
    "messages": [{"role": "user", "content": "x"}],
}


class Node:
    """A keep-alive HTTP/1.1 server that answers `ok` once `release` is set."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.most_open = 0
        self.pending = 0  # requests read, not yet answered
        self.heads: list[bytes] = []  # the request lines, in the order they arrived
        self.release = asyncio.Event()
        self.release.set()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Node:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.heads.append(head.split(b"\r\n", 1)[0])
                self.pending += 1
                await self.release.wait()
                self.pending -= 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        finally:
            self.open -= 1
            writer.close()


@pytest.fixture
def transport() -> Iterator[Http11Transport]:
    yield Http11Transport(max_connections=2)


@pytest.fixture
async def client(transport: Http11Transport) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(transport=transport, timeout=10) as c:
        yield c


async def test_requests_beyond_the_cap_wait_for_a_connection(
    transport: Http11Transport, client: httpx2.AsyncClient
) -> None:
    async with Node() as node:
        node.release.clear()
        tasks = [asyncio.create_task(client.get(node.url + f"/{i}")) for i in range(6)]
        # Two requests reach the node; four queue in the pool instead of connecting.
        await wait_until_async(lambda: (node.pending, transport.waiting), until=(2, 4).__eq__)
        assert node.accepted == 2 and transport.open_connections == 2
        node.release.set()
        replies = await asyncio.gather(*tasks)
    assert [r.text for r in replies] == ["ok"] * 6
    assert node.accepted == 2 and node.most_open == 2  # six answers over two connections
    assert transport.open_connections == 2 and transport.waiting == 0  # both idle, kept


async def test_a_freed_connection_goes_to_the_highest_priority_first() -> None:
    """Waiters are served by priority (lmfleet/priority.py), then in arrival order."""
    transport = Http11Transport(max_connections=1)
    async with httpx2.AsyncClient(transport=transport, timeout=10) as client, Node() as node:
        node.release.clear()
        tasks = [asyncio.create_task(client.get(node.url + "/hold"))]
        await wait_until_async(lambda: node.pending == 1)
        for path, priority in (("/low", -1), ("/first", 0), ("/high", 5), ("/second", 0)):
            extensions = {PRIORITY: priority}
            tasks.append(asyncio.create_task(client.get(node.url + path, extensions=extensions)))
            queued = len(tasks) - 1
            await wait_until_async(lambda n=queued: transport.waiting == n)
        node.release.set()
        await asyncio.gather(*tasks)
    order = [head.split()[1] for head in node.heads]
    assert order == [b"/hold", b"/high", b"/first", b"/second", b"/low"]


async def test_pool_timeout_when_every_connection_stays_busy(
    transport: Http11Transport, client: httpx2.AsyncClient
) -> None:
    short = httpx2.Timeout(10, pool=0.2)
    async with Node() as node:
        async with client.stream("GET", node.url) as one, client.stream("GET", node.url) as two:
            assert one.status_code == two.status_code == 200  # bodies unread: slots held
            with pytest.raises(httpx2.PoolTimeout, match=r"all 2 \(max_connections\)"):
                await client.get(node.url, timeout=short)
            assert transport.waiting == 0  # the timed-out request left the queue
        assert (await client.get(node.url, timeout=short)).text == "ok"
    assert node.accepted == 2


async def test_an_idle_connection_to_another_node_makes_room(client: httpx2.AsyncClient) -> None:
    short = httpx2.Timeout(10, pool=0.2)
    async with Node() as a, Node() as b, Node() as c:
        assert (await client.get(a.url)).text == "ok"
        assert (await client.get(b.url)).text == "ok"
        # At the cap with both idle: the oldest idle one (to a) is closed for c.
        assert (await client.get(c.url, timeout=short)).text == "ok"
        await wait_until_async(lambda: (a.open, b.open, c.open), until=(0, 1, 1).__eq__)


async def test_a_freed_slot_goes_to_the_waiter_of_another_node(
    transport: Http11Transport, client: httpx2.AsyncClient
) -> None:
    async with Node() as a, Node() as b:
        async with client.stream("GET", a.url), client.stream("GET", a.url):
            waiter = asyncio.create_task(client.get(b.url))
            await wait_until_async(lambda: transport.waiting == 1)
        # Closing the bodies returned a's connections: one went to b's waiter as a slot.
        assert (await waiter).text == "ok"
        assert transport.open_connections == 2
        await wait_until_async(lambda: (a.open, b.open), until=(1, 1).__eq__)


async def test_cancelled_waiters_leak_no_slot(
    transport: Http11Transport, client: httpx2.AsyncClient
) -> None:
    short = httpx2.Timeout(10, pool=0.5)
    async with Node() as node:
        for handed_over in (False, True):
            one = await client.send(client.build_request("GET", node.url), stream=True)
            two = await client.send(client.build_request("GET", node.url), stream=True)
            waiter = asyncio.create_task(client.get(node.url))
            await wait_until_async(lambda: transport.waiting == 1)
            if handed_over:
                # The connection is handed to the waiter, which is cancelled before it
                # runs again: it must pass the connection on, not drop it.
                await one.aclose()
                waiter.cancel()
            else:
                waiter.cancel()
                await one.aclose()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            await two.aclose()
            assert transport.open_connections == 2 and transport.waiting == 0
            replies = await asyncio.gather(*[client.get(node.url, timeout=short) for _ in range(2)])
            assert [r.text for r in replies] == ["ok", "ok"]
    assert node.accepted == 2


async def test_a_pool_timeout_is_no_failure_of_the_node(start_sim: StartSim) -> None:
    """The node never saw the request: no error, no streak, no circuit opened; and it
    is not retried elsewhere (every node would wait on the same pool)."""
    node = start_sim("--fast", "--health-poll-interval", "0.2")
    fleet = LMFleet.attach([node.url], health_interval=0.2)
    try:
        await asyncio.to_thread(fleet.wait_ready, 30.0)
        pool = Http11Transport(max_connections=1)
        async with httpx2.AsyncClient(
            transport=AsyncFleetTransport(fleet.router, pool), base_url="http://lmfleet.invalid"
        ) as client:
            held = await client.send(
                client.build_request("POST", "/v1/chat/completions", json=CHAT), stream=True
            )
            with pytest.raises(httpx2.PoolTimeout):
                await client.post(
                    "/v1/chat/completions", json=CHAT, timeout=httpx2.Timeout(10, pool=0.2)
                )
            await held.aread()
            await held.aclose()
            (state,) = fleet.registry.snapshot()
            assert state.status is NodeStatus.HEALTHY and state.failures == 0
            assert (state.errors, state.streak, state.error_rate, state.inflight) == (0, 0, 0, 0)
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    finally:
        fleet.close()


async def test_the_routed_clients_cap_their_connections_too(start_sim: StartSim) -> None:
    """`fleet.async_client()` hands `max_connections` to httpx2's pool (`Limits`),
    whose requests wait for a free connection just the same."""
    node = start_sim("--ttft-ms", "150", "--tpot-ms", "10", "--health-poll-interval", "0.2")
    options = FleetOptions(routing=RoutingOptions(max_connections=2))
    fleet = LMFleet.attach([node.url], options=options, health_interval=0.2)
    try:
        await asyncio.to_thread(fleet.wait_ready, 30.0)
        client = fleet.async_client(max_retries=0)
        replies = await asyncio.gather(
            *[
                client.chat.completions.create(
                    model=CHAT["model"], messages=[{"role": "user", "content": f"q{i}"}]
                )
                for i in range(6)
            ]
        )
        await client.close()
        assert all(r.choices[0].message.content for r in replies)
        stats = await asyncio.to_thread(sim_stats, node.url)
        assert stats["completed"] == 6 and stats["max_inflight"] == 2
    finally:
        fleet.close()
