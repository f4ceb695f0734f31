"""The health prober's HTTP client against scripted servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from lmfleet.launch.process import free_port
from lmfleet.node.client import auth_headers
from lmfleet.wire.prober import MAX_BODY, ProbeError, Prober, ProbeRequest

pytestmark = pytest.mark.anyio

Answer = Callable[[int], Awaitable[bytes | None]]
"""The reply to the n-th request (from 0) on a connection; None closes it instead."""


@pytest.fixture
async def prober() -> AsyncIterator[Prober]:
    prober = Prober()
    yield prober
    await prober.aclose()


class Node:
    """Counts connections and requests; answers with `answer`, closes after if told to."""

    def __init__(self, answer: Answer, close_after: bool) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for n in itertools.count():
                self.requests.append(await reader.readuntil(b"\r\n\r\n"))
                reply = await self.answer(n)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed first
        finally:
            writer.close()


async def serve(answer: Answer, close_after: bool = False) -> tuple[asyncio.Server, Node, str]:
    node = Node(answer, close_after)
    server = await asyncio.start_server(node.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, node, f"http://127.0.0.1:{port}"


def always(reply: bytes) -> Answer:
    async def answer(n: int) -> bytes:
        return reply

    return answer


async def test_chunked_body_and_keep_alive(prober: Prober) -> None:
    reply = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        b'b;ext=1\r\n{"status": \r\n'
        b'a\r\n"healthy"}\r\n'
        b"0\r\nx-trailer: yes\r\n\r\n"
    )
    server, node, url = await serve(always(reply))
    async with server:
        for _ in range(3):
            assert await prober.get(url, "/health", 5) == (200, b'{"status": "healthy"}')
    assert node.connections == 1  # one kept-alive connection served all three
    assert node.requests[0].startswith(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_content_length_body(prober: Prober) -> None:
    server, node, url = await serve(always(b"HTTP/1.1 503 Busy\r\ncontent-length: 4\r\n\r\nbusy"))
    async with server:
        assert await prober.get(url, "/health", 5) == (503, b"busy")
        assert await prober.get(url, "/health", 5) == (503, b"busy")
    assert node.connections == 1


async def test_connection_close_and_http10_are_not_reused(prober: Prober) -> None:
    for reply in (
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n\r\nok",  # no framing: the body ends when the node closes
    ):
        server, node, url = await serve(always(reply), close_after=True)
        async with server:
            assert await prober.get(url, "/health", 5) == (200, b"ok")
            assert await prober.get(url, "/health", 5) == (200, b"ok")
        assert node.connections == 2


async def test_a_stale_kept_alive_connection_is_retried(prober: Prober) -> None:
    async def answer(n: int) -> bytes | None:
        if n > 0:
            return None  # kept alive, then closed: the next request finds it dead
        return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    server, node, url = await serve(answer)
    async with server:
        for _ in range(3):
            assert await prober.get(url, "/health", 5) == (200, b"ok")
    assert node.connections == 3


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1 status line"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", "before the end of the body"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY + 1), "too large"),
    ],
)
async def test_bad_answers_are_probe_errors(prober: Prober, reply: bytes, message: str) -> None:
    server, _, url = await serve(always(reply), close_after=True)
    async with server:
        with pytest.raises(ProbeError, match=message):
            await prober.get(url, "/health", 5)


async def test_oversize_chunked_body_is_refused(prober: Prober) -> None:
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
    reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk * 20
    server, _, url = await serve(always(reply))
    async with server:
        with pytest.raises(ProbeError, match="too large"):
            await prober.get(url, "/health", 5)


async def test_refused_and_silent_nodes(prober: Prober) -> None:
    with pytest.raises(ProbeError):
        await prober.get(f"http://127.0.0.1:{free_port()}", "/health", 5)

    async def hang(n: int) -> bytes:
        await asyncio.sleep(5)  # a node that never answers (the probe times out first)
        return b""

    server, _, url = await serve(hang)
    async with server:
        with pytest.raises(ProbeError, match=r"no answer within 0\.2 s"):
            await prober.get(url, "/health", 0.2)


async def test_pipelined_gets_share_one_round_trip(prober: Prober) -> None:
    """`/health` and `/metrics` written together, answered in order on one connection."""
    replies = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nhealthy",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nload\r\n0\r\n\r\n",
    ]

    async def answer(n: int) -> bytes:
        return replies[n % 2]

    server, node, url = await serve(answer)
    async with server:
        for _ in range(2):
            got = await prober.get_many(
                ProbeRequest(url, ("/health", "/metrics"), auth_headers("k")), 5
            )
            assert got == [(200, b"healthy"), (200, b"load")]
    assert node.connections == 1
    assert [r.split(b" ", 2)[1] for r in node.requests] == [b"/health", b"/metrics"] * 2
    assert all(b"Authorization: Bearer k" in r for r in node.requests)


async def test_pipelined_gets_after_a_closing_answer_go_on_a_new_connection(
    prober: Prober,
) -> None:
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"
    server, node, url = await serve(always(closing), close_after=True)
    async with server:
        got = await prober.get_many(ProbeRequest(url, ("/health", "/metrics")), 5)
    assert got == [(200, b"ok"), (200, b"ok")]
    assert node.connections == 2


async def test_a_round_hands_over_each_node_as_it_completes(prober: Prober) -> None:
    """`gather` answers nodes in the order they finish; a silent one gets its
    `ProbeError` at the round's timeout, after the others."""

    async def silent(n: int) -> bytes:
        await asyncio.Event().wait()  # never answers; ends when the server closes
        return b""

    fast_server, fast, fast_url = await serve(
        always(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    )
    slow_server, _, slow_url = await serve(silent)
    got: list[tuple[str, object]] = []
    requests = [ProbeRequest(slow_url, ("/health",)), ProbeRequest(fast_url, ("/health", "/x"))]
    async with fast_server, slow_server:
        for _ in range(2):
            await prober.gather(requests, 0.5, lambda r, result: got.append((r.url, result)))
    assert [url for url, _ in got] == [fast_url, slow_url] * 2
    assert got[0][1] == [(200, b"ok"), (200, b"ok")]
    assert isinstance(got[1][1], ProbeError) and "no answer within 0.5 s" in str(got[1][1])
    assert fast.connections == 1  # the fast node's connection was kept between rounds
