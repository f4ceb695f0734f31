"""A minimal HTTP/1.1 GET for health probes, one kept-alive connection per node.

The monitor sends one `GET /health` per node per interval, forever (and `/metrics`
beside it when routing on load): with a general-purpose client that costs about
0.3 ms of CPU a probe here, which at 64 nodes and 1 s is several percent of a core.
This prober does only what a probe needs, at a tenth of that:

- `gather` probes a whole round of nodes from one task. Each node's requests are
  written at once on its kept-alive connection (an asyncio `Protocol`, so a read is
  one callback, not a task waking up); the task wakes when answers are ready and
  hands each node's to the caller as it completes. One timer bounds the round;
  a node that has not answered by then gets a `ProbeError`. A task, a stream pair
  and a cancel scope per node were most of the old cost.
- Several paths per node are pipelined (one write, answers read in order), so a
  node whose `/health` and `/metrics` are both read costs one round trip.
- Answers are parsed by the shared HTTP/1.1 codec (`lmfleet/wire/codec.py`, which the
  proxy's upstream transport uses too); the connection is kept when it says so.

It needs the asyncio event loop, which the fleet's loop always is (`background.py`).
Everything else the fleet sends still goes through httpx2.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from lmfleet.wire.codec import Http1Error, ResponseParser, encode_request_head

MAX_BODY = 1024 * 1024

Answers = list[tuple[int, bytes]]
"""(status, body) for each path of a request, in order."""


class ProbeError(Exception):
    """The node could not be reached or answered something that is not HTTP."""


@dataclass(frozen=True, slots=True)
class ProbeRequest:
    """GETs of `paths` on one node, each with `headers` (built by the node client:
    `lmfleet.node.client.NodeClient.probe`, which adds the node's key)."""

    url: str
    paths: tuple[str, ...]
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class _Target:
    host: str
    port: int
    tls: bool
    heads: tuple[bytes, ...]


class Prober:
    """GET small documents from nodes, reusing one connection per node."""

    def __init__(self) -> None:
        self._idle: dict[str, _Connection] = {}
        self._targets: dict[ProbeRequest, _Target] = {}

    def _target(self, request: ProbeRequest) -> _Target:
        target = self._targets.get(request)
        if target is None:
            parts = urlsplit(request.url)
            tls = parts.scheme == "https"
            headers = [(b"Host", parts.netloc.encode()), (b"Accept", b"*/*")]
            headers.extend((k.encode(), v.encode()) for k, v in request.headers)
            heads = tuple(encode_request_head(b"GET", p.encode(), headers) for p in request.paths)
            port = parts.port or (443 if tls else 80)
            target = _Target(parts.hostname or "", port, tls, heads)
            self._targets[request] = target
        return target

    async def get(
        self, url: str, path: str, timeout: float, headers: tuple[tuple[str, str], ...] = ()
    ) -> tuple[int, bytes]:
        """(status, body) of `GET url+path`; `ProbeError` on any failure or after `timeout`."""
        (answer,) = await self.get_many(ProbeRequest(url, (path,), headers), timeout)
        return answer

    async def get_many(self, request: ProbeRequest, timeout: float) -> Answers:
        """(status, body) of `GET url+path` for each of `paths`, pipelined on one connection.

        All of it within `timeout`, else `ProbeError`. A node that closes the connection
        after an answer (no keep-alive) gets the remaining requests on a new one.
        """
        got: list[Answers | ProbeError] = []
        await self.gather((request,), timeout, lambda _, result: got.append(result))
        (result,) = got
        if isinstance(result, ProbeError):
            raise result
        return result

    async def gather(
        self,
        requests: Sequence[ProbeRequest],
        timeout: float,
        answered: Callable[[ProbeRequest, Answers | ProbeError], None],
    ) -> None:
        """Send every request now; call `answered` (in this task) for each as it completes.

        A request not complete within `timeout` of the call is answered with a
        `ProbeError` and its connection closed. Returns when every request is answered.
        """
        loop = asyncio.get_running_loop()
        batch = _Batch(loop)
        exchanges = [_Exchange(self, batch, r, self._target(r)) for r in requests]
        timer = loop.call_later(timeout, batch.expire, exchanges, timeout)
        try:
            for exchange in exchanges:
                exchange.start()
            left = len(exchanges)
            while left:
                if not batch.finished:
                    batch.waiter = loop.create_future()
                    await batch.waiter
                finished, batch.finished = batch.finished, []
                left -= len(finished)
                for exchange in finished:
                    assert exchange.result is not None
                    answered(exchange.request, exchange.result)
        finally:
            timer.cancel()
            for exchange in exchanges:
                exchange.abort()

    def _pool(self, url: str, connection: _Connection) -> None:
        """Keep `connection` for the node's next request (one per node is enough)."""
        spare = self._idle.setdefault(url, connection)
        if spare is not connection:
            connection.close()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connection in idle.values():
            connection.close()


class _Batch:
    """The exchanges of one `gather` that have completed since its task last woke."""

    __slots__ = ("finished", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.finished: list[_Exchange] = []
        self.waiter: asyncio.Future[None] | None = None

    def done(self, exchange: _Exchange) -> None:
        self.finished.append(exchange)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def expire(self, exchanges: list[_Exchange], timeout: float) -> None:
        for exchange in exchanges:
            exchange.abort(ProbeError(f"no answer within {timeout:g} s"))


class _Exchange:
    """One request's life: on a pooled or new connection, then on a new one if the
    node closes after an answer while more are due. Driven by connection callbacks."""

    __slots__ = (
        "answers",
        "batch",
        "connection",
        "prober",
        "request",
        "result",
        "reused",
        "target",
        "task",
    )

    def __init__(
        self, prober: Prober, batch: _Batch, request: ProbeRequest, target: _Target
    ) -> None:
        self.prober = prober
        self.batch = batch
        self.request = request
        self.target = target
        self.answers: Answers = []
        self.result: Answers | ProbeError | None = None
        self.connection: _Connection | None = None
        self.task: asyncio.Task[None] | None = None
        self.reused = False

    def start(self) -> None:
        pooled = self.prober._idle.pop(self.request.url, None)
        if pooled is not None and not pooled.closed:
            self._send(pooled, reused=True)
        else:
            self._connect()

    def _connect(self) -> None:
        self.task = self.batch.loop.create_task(self._open())

    async def _open(self) -> None:
        target = self.target
        try:
            _, connection = await self.batch.loop.create_connection(
                _Connection, target.host, target.port, ssl=target.tls or None
            )
        except (OSError, ValueError) as exc:
            self._finish(ProbeError(f"{type(exc).__name__}: {exc}"))
            return
        if self.result is not None:
            connection.close()
        else:
            self._send(connection, reused=False)

    def _send(self, connection: _Connection, *, reused: bool) -> None:
        self.connection, self.reused = connection, reused
        heads = self.target.heads[len(self.answers) :]
        connection.expect(self, len(heads))
        connection.write(b"".join(heads))

    def answered(self, connection: _Connection, status: int, body: bytes, keep: bool) -> None:
        """One response complete; `keep`: the connection can carry another request."""
        self.answers.append((status, body))
        if len(self.answers) == len(self.target.heads):
            self.connection = None
            if keep:
                self.prober._pool(self.request.url, connection)
            else:
                connection.close()
            self._finish(self.answers)
        elif not keep:
            connection.close()
            self._connect()

    def lost(self, error: ProbeError, started: bool) -> None:
        """The connection ended before the answers did."""
        self.connection = None
        if self.reused and not started:
            self._connect()  # a kept-alive connection the node had closed: once, on a new one
        else:
            self._finish(error)

    def _finish(self, result: Answers | ProbeError) -> None:
        if self.result is None:
            self.result = result
            self.batch.done(self)

    def abort(self, error: ProbeError | None = None) -> None:
        """Stop where it is (closing its connection), answering `error` if still open."""
        if self.result is not None:
            return
        if self.task is not None:
            self.task.cancel()
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if error is not None:
            self._finish(error)


class _Connection(asyncio.Protocol):
    """One node connection: parses answers to the pipelined requests of its exchange."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.parser = ResponseParser()
        self.body = bytearray()
        self.left = 0
        self.started = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def expect(self, exchange: _Exchange, count: int) -> None:
        self.exchange, self.left, self.started = exchange, count, False
        self.parser, self.body = ResponseParser(), bytearray()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted again
            return
        self.started = True
        try:
            while True:
                parser = self.parser
                for piece in parser.feed(data):
                    self.body += piece
                head = parser.head
                if len(self.body) > MAX_BODY or (
                    head is not None and head.content_length > MAX_BODY
                ):
                    raise ProbeError("response body too large")
                if not parser.done:
                    return
                assert head is not None  # done implies a head
                data, self.left = parser.rest, self.left - 1
                keep = head.keep_alive and (bool(self.left) or not data)
                body = bytes(self.body)
                if self.left and keep:
                    self.parser, self.body = ResponseParser(), bytearray()
                else:
                    self.exchange = None
                exchange.answered(self, head.status, body, keep)
                if self.exchange is None or not data:
                    return
        except (Http1Error, ProbeError) as exc:
            self.exchange = None
            self.close()
            exchange.lost(exc if isinstance(exc, ProbeError) else ProbeError(str(exc)), True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        try:
            self.parser.feed_eof()  # the end of a read-until-close body, else an error
        except Http1Error as error:
            exchange.lost(ProbeError(str(error)), self.started)
            return
        assert self.parser.head is not None
        exchange.answered(self, self.parser.head.status, bytes(self.body), False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
