"""`Http11Transport`: a small HTTP/1.1 client transport for the proxy's upstream hop.

Profiling the proxy showed httpx2's general-purpose pool (connection bookkeeping
that is linear in open connections, URL re-parsing, several layers of stream
wrappers) taking three quarters of its CPU per request. Talking to a fleet node
needs far less: plain HTTP/1.1 over keep-alive connections, content-length or
chunked bodies. This transport does exactly that on an asyncio protocol and plugs
in under `AsyncFleetTransport` like any httpx2 transport, so routing, leasing and
failover stay the one shared implementation. The bytes on the wire are written and
read by the shared HTTP/1.1 codec (`lmfleet/wire/codec.py`, the health prober's too);
this module owns the I/O: connections, the pool, timeouts, error mapping.

`max_connections` caps the connections open at once over all nodes (httpx2's
`Limits.max_connections` has the same meaning, so the option means one thing on
both front doors). A request that finds every connection busy waits, first come
first served, for one to come back (up to the request's `pool` timeout, then
`httpx2.PoolTimeout`), rather than open one more: a burst of long streams must
not turn into a burst of sockets on the nodes or of file descriptors here. At the
cap, an idle connection to another node is closed to make room (httpcore's rule),
so idle connections never starve a node that has none.

Errors are mapped onto httpx2's exception types (the router's failover rules
read them): refused or timed-out connects are `ConnectError` / `ConnectTimeout`,
a connection dropped before the response head is `RemoteProtocolError`, and so on.
A kept-alive connection that turns out to be closed by the node before any
response byte arrives is retried once on a new connection (the node never saw the
request).

Read timeouts are one lazily checked timer per connection (`_Watchdog`), renewed by
each read, rather than a cancel scope around every read: on SSE that scope cost
more CPU than the rest of the relay (and a timer made and cancelled per request
was 2 % of a proxied chat request's CPU). Responses are read in bulk and fed to the
codec, so a burst of chunks that arrived together costs one read, not two per
chunk, and a small response costs one read for head and body together.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx2

from lmfleet.priority import PRIORITY, rank
from lmfleet.wire.codec import Http1Error, ResponseParser, encode_request_head
from lmfleet.wire.deadline import Deadline
from lmfleet.wire.headers import headers_from

HIGH_WATER = 256 * 1024
"""Unread bytes from a node beyond which its connection stops being read."""

DEFAULT_MAX_CONNECTIONS = 1024
"""`RoutingOptions.max_connections`'s default."""

Origin = tuple[str, str, int]


class StaleConnection(httpx2.RemoteProtocolError):
    """The node closed the connection before answering a byte: on a kept-alive
    connection, the node had closed it while idle and never saw the request, so the
    pool sends it again on a new one; on a new connection, it reaches the caller as
    the dropped connection it is (a `RemoteProtocolError`)."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a node, read as the bytes arrive.

    A protocol rather than asyncio's streams: what arrives is kept as the bytes
    objects the loop hands over (a `StreamReader` copies them into its buffer and out
    again) and a read is one future. Reading pauses while `HIGH_WATER` bytes wait
    unread (a caller slower than its node), as a `StreamReader`'s does."""

    __slots__ = (
        "_chunks",
        "_drained",
        "_eof",
        "_error",
        "_paused",
        "_size",
        "_waiter",
        "transport",
        "watchdog",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        self.watchdog: _Watchdog | None = None
        """The read deadline of its exchanges (made by the first that has one)."""

    # -- the loop's side ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close: a node that ends its side is done with the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._wake()
        if self.watchdog is not None:
            self.watchdog.deadline.stop()
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the transport's side -------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        if self._drained is not None:
            await self._drained
        if self._error is not None:
            raise self._error

    async def read(self) -> bytes:
        """What arrived since the last read (waiting for some); b"" at the end."""
        if not self._chunks and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._size = 0
            if self._paused:
                self._paused = False
                self.transport.resume_reading()
            return data
        if self._error is not None:
            raise self._error
        return b""

    @property
    def usable(self) -> bool:
        return not self._eof and not self.transport.is_closing()

    def close(self) -> None:
        self.transport.close()


def _timeout(request: httpx2.Request, key: str) -> float | None:
    value = request.extensions.get("timeout", {}).get(key)
    return float(value) if value is not None else None


SOCKET_ERRORS = (TimeoutError, Http1Error, ValueError, OSError)
"""What a socket or the codec raises, mapped to httpx2's types (`_error_of`)."""


def _error_of(exc: Exception, phase: str) -> httpx2.TransportError:
    """A socket-level failure as httpx2's type, by phase of the exchange (without its
    request: the httpx2 adapter sets it, `Http11Transport.handle_async_request`)."""
    if isinstance(exc, TimeoutError):
        kind = {"connect": httpx2.ConnectTimeout, "write": httpx2.WriteTimeout}
        return kind.get(phase, httpx2.ReadTimeout)(f"{phase} timed out")
    if isinstance(exc, (Http1Error, ValueError)):
        return httpx2.RemoteProtocolError(f"{phase}: {exc}")
    failed = {"connect": httpx2.ConnectError, "write": httpx2.WriteError}
    return failed.get(phase, httpx2.ReadError)(f"{phase}: {exc!r}")


@contextlib.contextmanager
def _mapped(phase: str) -> Iterator[None]:
    """`_error_of` around a block (the paths taken once per connection; the exchange
    itself maps inline: a context manager costs ~4 calls)."""
    try:
        yield
    except SOCKET_ERRORS as exc:
        raise _error_of(exc, phase) from exc


class _Watchdog:
    """A connection's read deadline, which each read of an exchange renews, checked
    by one timer that lives as long as the connection is used (`Deadline`).

    When the node sends nothing for `timeout` seconds the connection is aborted, so
    the pending read ends; `fired` tells the reader to report a `ReadTimeout`.
    Between exchanges it is disarmed: the next exchange keeps the timer when it falls
    due no later than its own deadline (the same timeout each time: one timer per
    `timeout` seconds of use, not one made and cancelled per request).
    """

    __slots__ = ("_conn", "_timeout", "deadline", "fired")

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self._timeout = 0.0
        self.fired = False
        self.deadline = Deadline(asyncio.get_running_loop(), self._fire)

    def arm(self, timeout: float) -> _Watchdog:
        """An exchange's deadline, `timeout` seconds from now and from each read."""
        self._timeout = timeout
        self.fired = False
        self.deadline.arm(timeout)
        return self

    def renew(self) -> None:
        if self.deadline.when is not None:
            self.deadline.arm(self._timeout)

    def disarm(self) -> None:
        """The exchange is over (the connection may serve another)."""
        self.deadline.disarm()

    def _fire(self) -> None:
        self.fired = True
        self._conn.transport.abort()


_Waiter = tuple[float, int, Origin, "asyncio.Future[_Conn | None]"]
"""A request waiting for a connection: (its `priority.rank`, its arrival, its origin,
the future a connection or a slot is handed through)."""


class Http11Transport(httpx2.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 to a set of nodes: at most `max_connections` open at once.

    Slot accounting: `_open` counts every connection that is open, being opened, or
    reserved by a request about to open one. A slot belongs to the request from
    `_checkout` until its response body takes it over (`_Body`), and then to the
    body until it is closed, when the connection goes back idle or is closed.
    Requests that find no slot queue in `_waiters`; a freed slot or a returned
    connection goes to the first of them, never to a newcomer (no queue jumping):
    first by priority, aged (lmfleet/priority.py), then in arrival order.
    Not thread-safe: one transport serves one event loop (the proxy's).
    """

    def __init__(
        self,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_idle_per_origin: int | None = None,
        ssl_context: Any = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self._max = max_connections
        self._max_idle = max_connections if max_idle_per_origin is None else max_idle_per_origin
        self._open = 0
        self._idle: dict[Origin, list[_Conn]] = {}
        self._waiters: list[_Waiter] = []  # a heap: the first to serve at [0]
        self._arrivals = itertools.count()
        self._closed = False
        self._ssl = ssl_context or ssl.create_default_context()

    @property
    def open_connections(self) -> int:
        """Connections open now (idle ones included), or reserved by a request opening one."""
        return self._open

    @property
    def waiting(self) -> int:
        """Requests queued for a connection."""
        return sum(not waiter.done() for *_, waiter in self._waiters)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        await request.aread()
        try:
            sent = encode_request_head(request.method.encode(), url.raw_path, request.headers.raw)
        except Http1Error as exc:
            raise httpx2.LocalProtocolError(str(exc), request=request) from exc
        pooled = await self._checkout(request, origin)
        try:
            answer = await self.exchange(
                origin,
                pooled,
                sent + request.content,
                read_timeout=_timeout(request, "read"),
                connect_timeout=_timeout(request, "connect"),
                head_request=request.method == "HEAD",
            )
        except httpx2.TransportError as exc:
            exc.request = request
            raise
        head = answer.head
        return httpx2.Response(
            head.status,
            headers=headers_from(head.headers),
            stream=answer.stream(request),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason},
        )

    def checkout_now(self, origin: Origin) -> tuple[bool, _Conn | None]:
        """A slot for `origin` without waiting: (True, an idle connection or None to
        open one), or (False, None) when a request would have to queue for one (the
        caller then goes the way that may wait: `handle_async_request`)."""
        if self._queued():
            return False, None
        conn = self._take(origin)
        if conn is not None:
            return True, conn
        if self._open < self._max:
            self._open += 1
            return True, None
        return self._evict_idle(), None

    async def exchange(
        self,
        origin: Origin,
        pooled: _Conn | None,
        payload: bytes,
        *,
        read_timeout: float | None,
        connect_timeout: float | None,
        head_request: bool = False,
    ) -> Exchanged:
        """Send `payload` (a request's head and body) on the slot taken by a checkout
        (`pooled`: its idle connection, or None to open one) and read the answer's
        head; httpx2's error types (without a request) on failure, the slot freed.
        A pooled connection the node had closed is replaced once (`StaleConnection`)."""
        try:
            if pooled is not None:
                try:
                    return await self._exchange(origin, pooled, payload, read_timeout, head_request)
                except StaleConnection:
                    pass  # its slot carries over to a new connection
            conn = await self._connect(origin, connect_timeout)
            return await self._exchange(origin, conn, payload, read_timeout, head_request)
        except BaseException:
            self._free_slot()
            raise

    # -- the pool -------------------------------------------------------------------

    async def _checkout(self, request: httpx2.Request, origin: Origin) -> _Conn | None:
        """An idle connection to `origin`, or None with a slot reserved to open one.

        Waits, queued behind earlier requests, while all `max_connections` are busy;
        `httpx2.PoolTimeout` after the request's `pool` timeout.
        """
        got, conn = self.checkout_now(origin)
        return conn if got else await self._wait(request, origin)

    def _take(self, origin: Origin) -> _Conn | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable:
                return conn
            self._discard(conn)
        return None

    def _evict_idle(self) -> bool:
        """Close the oldest idle connection (to any node); its slot passes to the caller."""
        for idle in self._idle.values():
            if idle:
                idle.pop(0).close()
                return True
        return False

    async def _wait(self, request: httpx2.Request, origin: Origin) -> _Conn | None:
        waiter: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
        place = rank(request.extensions.get(PRIORITY, 0), time.monotonic())
        heapq.heappush(self._waiters, (place, next(self._arrivals), origin, waiter))
        timeout = _timeout(request, "pool")
        try:
            with anyio.fail_after(timeout):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # Handed a connection or a slot just as this wait ended: pass it on.
                conn = waiter.result()
                if conn is None:
                    self._free_slot()
                else:
                    self._give_back(origin, conn)
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise httpx2.PoolTimeout(
                    f"no upstream connection free within {timeout:g} s: all "
                    f"{self._max} (max_connections) are in use",
                    request=request,
                ) from None
            raise

    def _queued(self) -> bool:
        """Whether a request still waits (ones that gave up are dropped from the front)."""
        waiters = self._waiters
        while waiters and waiters[0][3].done():
            heapq.heappop(waiters)
        return bool(waiters)

    def _next_waiter(self) -> tuple[Origin, asyncio.Future[_Conn | None]] | None:
        waiters = self._waiters
        while waiters:
            *_, origin, waiter = heapq.heappop(waiters)
            if not waiter.done():
                return origin, waiter
        return None

    def _free_slot(self) -> None:
        """A connection closed (or was never opened): its slot goes to the next waiter."""
        waiter = self._next_waiter()
        if waiter is None:
            self._open -= 1
        else:
            waiter[1].set_result(None)

    def _discard(self, conn: _Conn) -> None:
        conn.close()
        self._free_slot()

    def _give_back(self, origin: Origin, conn: _Conn) -> None:
        """A connection whose exchange ended cleanly: to the next waiter, or idle."""
        if not conn.usable or self._closed:
            self._discard(conn)
            return
        waiter = self._next_waiter()
        if waiter is not None:
            wanted, future = waiter
            if wanted == origin:
                future.set_result(conn)
            else:  # its slot serves the waiter's node
                conn.close()
                future.set_result(None)
            return
        idle = self._idle.setdefault(origin, [])
        if len(idle) < self._max_idle:
            idle.append(conn)
        else:
            self._discard(conn)

    async def _connect(self, origin: Origin, timeout: float | None) -> _Conn:
        scheme, host, port = origin
        with _mapped("connect"), anyio.fail_after(timeout):
            tls = self._ssl if scheme == "https" else None
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(_Conn, host, port, ssl=tls)
        return conn

    async def _exchange(
        self,
        origin: Origin,
        conn: _Conn,
        payload: bytes,
        read_timeout: float | None,
        head_request: bool,
    ) -> Exchanged:
        """Send and read the head; on failure the connection is closed, its slot kept."""
        watchdog = None
        if read_timeout is not None:
            watchdog = (conn.watchdog or _Watchdog(conn)).arm(read_timeout)
            conn.watchdog = watchdog
        parser = ResponseParser(head_request=head_request)
        first: list[bytes] = []  # body bytes that arrived with the head
        phase = "write"
        try:
            try:
                conn.write(payload)
                await conn.drain()
                phase = "read"
                while parser.head is None:
                    data = await conn.read()
                    if not data:
                        parser.feed_eof()  # raises: the head is incomplete
                    first = parser.feed(data)
            except SOCKET_ERRORS as exc:
                raise _error_of(exc, phase) from exc
            if watchdog is not None:
                watchdog.renew()
        except httpx2.TransportError as exc:
            conn.close()
            if watchdog is not None:
                watchdog.disarm()
                if watchdog.fired:
                    raise httpx2.ReadTimeout("read timed out") from exc
            if isinstance(exc, httpx2.RemoteProtocolError) and not parser.started:
                raise StaleConnection(str(exc)) from exc
            raise
        except BaseException:
            conn.close()
            if watchdog is not None:
                watchdog.disarm()
            raise
        return Exchanged(self, origin, conn, parser, first, watchdog)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                self._discard(conn)


class Exchanged:
    """An answer whose head was read: its body still arriving on the connection, which
    it holds (with its slot) until `close`, and gives back when the body was read whole.

    What both readers of an answer share: httpx2's (`_Body`, for the pipeline) and
    the proxy's fast lane (lmfleet/proxy/fast_lane.py), which relays the pieces as
    they come without an httpx2 response around them."""

    __slots__ = ("_origin", "_pool", "conn", "first", "head", "parser", "watchdog")

    def __init__(
        self,
        pool: Http11Transport,
        origin: Origin,
        conn: _Conn,
        parser: ResponseParser,
        first: list[bytes],
        watchdog: _Watchdog | None,
    ) -> None:
        self._pool = pool
        self._origin = origin
        self.conn: _Conn | None = conn
        self.parser = parser
        head = parser.head
        assert head is not None
        self.head = head
        self.first = first
        """Body pieces that arrived with the head (the whole body of most small answers)."""
        self.watchdog = watchdog
        if parser.done and watchdog is not None:
            watchdog.disarm()

    async def more(self) -> list[bytes]:
        """The body pieces that arrive next (one read's worth, not empty), or [] once
        the body is complete; httpx2's `ReadTimeout` when the node went silent for the
        read timeout, its other types (no request set) when the body was cut."""
        parser, conn, watchdog = self.parser, self.conn, self.watchdog
        if conn is None:
            return []
        try:
            while not parser.done:
                data = await conn.read()
                if watchdog is not None:
                    watchdog.renew()
                if not data:
                    if watchdog is not None and watchdog.fired:
                        raise TimeoutError
                    parser.feed_eof()
                pieces = parser.feed(data)
                if pieces:
                    return pieces
        except SOCKET_ERRORS as exc:
            if watchdog is not None and watchdog.fired:
                raise httpx2.ReadTimeout("body: read timed out") from exc
            raise _error_of(exc, "body") from exc
        if watchdog is not None:
            watchdog.disarm()
        return []

    def stream(self, request: httpx2.Request | None = None) -> httpx2.AsyncByteStream:
        """The body as httpx2's stream (errors carry `request`)."""
        return _Body(self, request)

    def close(self) -> None:
        """Give the connection back (the body was read whole) or close it; once."""
        watchdog, self.watchdog = self.watchdog, None  # the connection may serve another
        if watchdog is not None:
            watchdog.disarm()
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.parser.keep_alive:
            self._pool._give_back(self._origin, conn)
        else:
            self._pool._discard(conn)


class _Body(httpx2.AsyncByteStream):
    """An `Exchanged` answer's body as httpx2's stream (the pipeline's reader)."""

    __slots__ = ("_answer", "_request")

    def __init__(self, answer: Exchanged, request: httpx2.Request | None) -> None:
        self._answer = answer
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        answer = self._answer
        first, answer.first = answer.first, []
        for data in first:
            yield data
        try:
            while pieces := await answer.more():
                for piece in pieces:
                    yield piece
        except httpx2.TransportError as exc:
            if self._request is not None:
                exc.request = self._request
            raise

    async def aclose(self) -> None:
        self._answer.close()
