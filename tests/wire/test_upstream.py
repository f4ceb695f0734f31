"""Http11Transport against real servers on loopback: a sim node and scripted raw sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx2
import pytest
from support import StartSim

from lmfleet.launch.process import free_port
from lmfleet.wire.upstream import Http11Transport

pytestmark = pytest.mark.anyio

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(script: Script) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(script, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(transport=Http11Transport(), timeout=5) as c:
        yield c


async def test_against_a_real_sim_node_streaming_and_not(
    start_sim: StartSim, client: httpx2.AsyncClient
) -> None:
    node = start_sim("--fast")
    body = {"model": "internlm/internlm2_5-7b-chat", "messages": [{"role": "user", "content": "x"}]}
    for _ in range(3):  # the same kept-alive connection serves every request
        reply = await client.post(node.url + "/v1/chat/completions", json=body)
        assert reply.status_code == 200 and reply.json()["object"] == "chat.completion"
    lines = []
    async with client.stream(
        "POST", node.url + "/v1/chat/completions", json={**body, "stream": True}
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for line in stream.aiter_lines():
            if line:
                lines.append(line)
    assert lines[-1] == "data: [DONE]" and len(lines) > 2
    health = await client.get(node.url + "/health")
    assert health.status_code == 200


async def test_chunked_and_close_delimited_bodies(client: httpx2.AsyncClient) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if b"/chunked" in request:
            writer.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n"
            )
            await writer.drain()
            await script(reader, writer)  # keep-alive: serve the next request too
        else:
            writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
            await writer.drain()
            writer.close()

    server, url = await serve(script)
    async with server:
        assert (await client.get(url + "/chunked")).text == "hello world"
        assert (await client.get(url + "/chunked")).text == "hello world"
        assert (await client.get(url + "/close")).text == "until the end"


async def test_stale_keepalive_connection_is_retried_once(client: httpx2.AsyncClient) -> None:
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        # keep-alive announced, yet closed right after: the next request finds it dead
        writer.close()

    server, url = await serve(script)
    async with server:
        for _ in range(3):
            assert (await client.get(url + "/")).text == "ok"
    assert connections == 3


async def test_errors_map_to_httpx2_types(client: httpx2.AsyncClient) -> None:
    with pytest.raises(httpx2.ConnectError):
        await client.get(f"http://127.0.0.1:{free_port()}/")

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    server, url = await serve(drop)
    async with server:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(url + "/")

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)  # a server that never answers (the client times out first)

    server, url = await serve(hang)
    async with server:
        with pytest.raises(httpx2.ReadTimeout):
            await client.get(url + "/", timeout=0.2)

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    server, url = await serve(cut)
    async with server:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(url + "/")


async def test_request_bytes_reach_the_server_unchanged(client: httpx2.AsyncClient) -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    raw = json.dumps({"top_k": 5, "session_id": 3}, separators=(",", ":")).encode()
    server, url = await serve(record)
    async with server:
        reply = await client.post(url + "/v1/x?a=1", content=raw, headers={"x-custom": "yes"})
    assert reply.status_code == 204
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/x?a=1 HTTP/1.1\r\n") and b"x-custom: yes" in head
    assert body == raw


class KeptAlive:
    """A scripted server answering each request of a kept-alive connection with what
    `answer` gives (None: it ends the connection), counting the connections."""

    def __init__(self, answer: Callable[[bytes], Awaitable[bytes | None]]) -> None:
        self.answer = answer
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while True:
            try:
                request = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            reply = await self.answer(request)
            if reply is None:
                return
            writer.write(reply)
            await writer.drain()


async def test_reuse_follows_the_codec(client: httpx2.AsyncClient) -> None:
    """HEAD and 204 answers are complete at once; bytes after a body end the connection."""

    async def answer(request: bytes) -> bytes:
        if request.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n"
        if b"/interim" in request:
            return b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokGARBAGE"

    script = KeptAlive(answer)
    server, url = await serve(script)
    async with server:
        assert (await client.head(url + "/")).headers["content-length"] == "99"
        assert (await client.get(url + "/interim")).status_code == 204
        assert script.connections == 1  # both answers left the connection reusable
        assert (await client.get(url + "/")).text == "ok"
        assert (await client.get(url + "/")).text == "ok"
        assert script.connections == 2  # the trailing bytes made the first one unusable


async def test_line_breaks_in_request_headers_are_refused(client: httpx2.AsyncClient) -> None:
    with pytest.raises(httpx2.LocalProtocolError, match="line break"):
        await client.get(f"http://127.0.0.1:{free_port()}/", headers={"x-a": "a\r\nInjected: 1"})


async def test_malformed_response_head_is_a_remote_protocol_error(
    client: httpx2.AsyncClient,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n")
        await writer.drain()
        writer.close()

    server, url = await serve(script)
    async with server:
        with pytest.raises(httpx2.RemoteProtocolError, match="bad header line"):
            await client.get(url + "/")


async def test_a_kept_alive_connection_times_out_each_exchange_by_its_own_timeout(
    client: httpx2.AsyncClient,
) -> None:
    """One read deadline per connection (`_Watchdog`), kept between exchanges: a
    later exchange with a shorter timeout than the timer left set by the one before
    (30 s) still times out on time, and the one after that is not cut by it."""

    async def answer(request: bytes) -> bytes | None:
        if b"/hang" in request:
            await asyncio.sleep(10)  # never answers in time
            return None
        return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    script = KeptAlive(answer)
    server, url = await serve(script)
    async with server:
        assert (await client.get(url + "/", timeout=30)).text == "ok"
        started = asyncio.get_running_loop().time()
        with pytest.raises(httpx2.ReadTimeout):
            await client.get(url + "/hang", timeout=0.3)
        assert asyncio.get_running_loop().time() - started < 5  # not the first one's 30 s
        assert script.connections == 1  # it was the kept-alive connection
        for _ in range(3):  # a new connection; each answer in time, none cut
            assert (await client.get(url + "/", timeout=0.5)).text == "ok"
            await asyncio.sleep(0.3)
        assert script.connections == 2
