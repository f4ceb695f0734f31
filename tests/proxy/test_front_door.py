"""The proxy's front door (lmfleet/proxy/front_door.py) on the wire: raw sockets, so
that what a caller's bytes look like is what the test controls. Kept-alive and
pipelined requests are answered in order, a sized answer leaves in one piece, and
every request the door does not take (a chunked body, `Expect: 100-continue`,
`HEAD`, a malformed head) is answered by uvicorn's protocol on the same connection."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import pytest
from support import sim_served

from lmfleet import LMFleet
from lmfleet.proxy import ProxyOptions, ProxyServer

Served = tuple[LMFleet, ProxyServer]
MODEL = "internlm/internlm2_5-7b-chat"
CHAT = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
).encode()


class Wire:
    """One connection to the proxy, read answer by answer."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            assert self._fill(), "the connection closed inside an answer"
        taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            assert self._fill(), "the connection closed inside an answer"
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def answer(self, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next answer: status, headers (lower-case names), body."""
        status = int(self._line().split(b" ")[1])
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if head_only or status in (100, 204, 304):
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self._take(int(headers["content-length"]))
        assert headers.get("transfer-encoding") == "chunked", headers
        body = b""
        while size := int(self._line(), 16):
            body += self._take(size)
            assert self._take(2) == b"\r\n"
        assert self._line() == b""
        return status, headers, body

    def closed(self) -> bool:
        """True once the proxy closed the connection (after what was read)."""
        return not self.buffer and not self._fill()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _post(path: str, body: bytes, *extra: bytes) -> bytes:
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"host: proxy"]
    head += [b"content-type: application/json", b"content-length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@pytest.fixture
def proxy(serve_fleet: Callable[..., Served], two_nodes: list[str]) -> Served:
    return serve_fleet(two_nodes, strategy="round_robin")


def test_kept_alive_and_pipelined_requests_are_answered_in_order(
    proxy: Served, two_nodes: list[str]
) -> None:
    _, server = proxy
    with Wire(server.url) as wire:
        # Three requests in one write, then one whose head and body come apart.
        wire.send(_post("/v1/chat/completions", CHAT) * 2 + b"GET /health HTTP/1.1\r\n\r\n")
        for _ in range(2):
            status, headers, body = wire.answer()
            assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
            assert headers["content-length"] == str(len(body))
        status, _, body = wire.answer()
        assert status == 200 and json.loads(body)["status"] == "healthy"
        request = _post("/v1/chat/completions", CHAT)
        split = request.index(b"\r\n\r\n") + 4
        wire.send(request[:split])
        wire.send(request[split : split + 10])
        wire.send(request[split + 10 :])
        status, _, body = wire.answer()
        assert status == 200 and json.loads(body)["object"] == "chat.completion"
        # An unknown model: the router's own answer, sized, on the same connection.
        bad = json.dumps({"model": "nope", "messages": []}).encode()
        wire.send(_post("/v1/chat/completions", bad, b"connection: close"))
        status, headers, body = wire.answer()
        assert status == 404 and json.loads(body)["object"] == "error"
        assert headers["connection"] == "close" and wire.closed()
    assert sum(sim_served(url) for url in two_nodes) == 3


def test_requests_the_door_does_not_take_go_to_uvicorn_on_the_same_connection(
    proxy: Served, two_nodes: list[str]
) -> None:
    _, server = proxy
    with Wire(server.url) as wire:
        # A chunked body: uvicorn's protocol reads it; the connection stays with it.
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\n"
        head += b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        half = len(CHAT) // 2
        chunks = b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (
            half,
            CHAT[:half],
            len(CHAT) - half,
            CHAT[half:],
        )
        wire.send(head + chunks)
        status, _, body = wire.answer()
        assert status == 200 and json.loads(body)["object"] == "chat.completion"
        wire.send(_post("/v1/chat/completions", CHAT))  # the next one, still answered
        assert wire.answer()[0] == 200
        wire.send(b"HEAD /health HTTP/1.1\r\nhost: p\r\n\r\n")
        status, headers, _ = wire.answer(head_only=True)  # the proxy has no HEAD routes
        assert status == 405 and headers["allow"] == "GET"
        wire.send(_post("/v1/chat/completions", CHAT))  # no body came after that head
        assert wire.answer()[0] == 200

    with Wire(server.url) as wire:
        wire.send(_post("/v1/chat/completions", CHAT, b"expect: 100-continue")[: -len(CHAT)])
        assert wire.answer()[0] == 100  # uvicorn asks for the body
        wire.send(CHAT)
        assert wire.answer()[0] == 200

    with Wire(server.url) as wire:
        wire.send(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: x\r\n\r\n")
        assert wire.answer()[0] == 400  # malformed: uvicorn's 400, then the connection ends
        assert wire.closed()
    assert sum(sim_served(url) for url in two_nodes) == 4


def test_an_http_1_0_caller_gets_its_answer_and_the_connection_ends(proxy: Served) -> None:
    _, server = proxy
    with Wire(server.url) as wire:
        request = _post("/v1/chat/completions", CHAT).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        wire.send(request)
        status, headers, body = wire.answer()
        assert status == 200 and json.loads(body)["object"] == "chat.completion"
        assert headers["connection"] == "close" and wire.closed()


def test_a_body_answered_before_it_arrived_is_skipped_and_the_connection_kept(
    serve_fleet: Callable[..., Served], two_nodes: list[str]
) -> None:
    options = ProxyOptions(max_body_bytes=1000)
    _, server = serve_fleet(two_nodes, serve={"options": options})
    with Wire(server.url) as wire:
        big = b"x" * 3000
        request = _post("/v1/chat/completions", big)
        wire.send(request[: len(request) - 2500])  # the head and 500 bytes of the body
        status, headers, _ = wire.answer()
        assert status == 413 and "connection" not in headers
        wire.send(request[len(request) - 2500 :] + _post("/v1/chat/completions", CHAT))
        status, _, body = wire.answer()  # the rest was dropped, the next one read
        assert status == 200 and json.loads(body)["object"] == "chat.completion"
        # A body too big to read and drop: the answer ends the connection.
        wire.send(
            _post("/v1/chat/completions", b"")[:-4].replace(b"length: 0", b"length: 9999999")
            + b"\r\n\r\n"
        )
        status, headers, _ = wire.answer()
        assert status == 413 and headers["connection"] == "close" and wire.closed()


def test_a_head_that_never_ends_does_not_hold_the_connection(proxy: Served) -> None:
    _, server = proxy
    with Wire(server.url) as wire:
        wire.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\n")  # and nothing more
        wire.sock.settimeout(15)  # a recv that times out fails the test
        assert wire.closed()  # uvicorn's keep-alive timeout (5 s) from the connection's start


def test_a_connection_in_use_outlives_the_keep_alive_timeout_counted_from_its_start(
    proxy: Served,
) -> None:
    """The idle deadline moves on with each answer (one timer per connection checks it,
    `FrontDoor._idle_check`): requests 3.5 s apart on one connection are answered past
    the 5 s counted from the first, which a timer that was not moved would have cut."""
    _, server = proxy
    with Wire(server.url) as wire:
        for _ in range(3):
            wire.send(_post("/v1/chat/completions", CHAT))
            status, _, _ = wire.answer()
            assert status == 200
            time.sleep(3.5)  # idle, but less than uvicorn's keep-alive timeout (5 s)
