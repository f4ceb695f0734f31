"""`Http11Transport`: a small HTTP/1.1 client transport for the proxy's upstream hop.

Profiling the proxy showed httpx2's general-purpose pool (connection bookkeeping
that is linear in open connections, URL re-parsing, several layers of stream
wrappers) taking three quarters of its CPU per request. Talking to a fleet node
needs far less: plain HTTP/1.1 over keep-alive connections, content-length or
chunked bodies. This transport does exactly that on asyncio streams and plugs
in under `AsyncFleetTransport` like any httpx2 transport, so routing, leasing and
failover stay the one shared implementation. The bytes on the wire are written and
read by the shared HTTP/1.1 codec (`lmfleet/http1.py`, the health prober's too);
this module owns the I/O: connections, the idle pool, timeouts, error mapping.

Errors are mapped onto httpx2's exception types (the router's failover rules
read them): refused or timed-out connects are `ConnectError` / `ConnectTimeout`,
a connection dropped before the response head is `RemoteProtocolError`, and so on.
A kept-alive connection that turns out to be closed by the node before any
response byte arrives is retried once on a new connection (the node never saw the
request).

Read timeouts are one lazily checked timer per exchange (`_Watchdog`), renewed by
each read, rather than a cancel scope around every read: on SSE that scope cost
more CPU than the rest of the relay. Responses are read in bulk and fed to the
codec, so a burst of chunks that arrived together costs one read, not two per
chunk, and a small response costs one read for head and body together.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx2

from lmfleet.http1 import Http1Error, ResponseParser, encode_request_head

READ_SIZE = 64 * 1024

Origin = tuple[str, str, int]


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @property
    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


def _timeout(request: httpx2.Request, key: str) -> float | None:
    value = request.extensions.get("timeout", {}).get(key)
    return float(value) if value is not None else None


@contextlib.contextmanager
def _mapped(request: httpx2.Request, phase: str) -> Iterator[None]:
    """Turn socket-level failures into httpx2's types, by phase of the exchange."""
    try:
        yield
    except TimeoutError as exc:
        kind = {"connect": httpx2.ConnectTimeout, "write": httpx2.WriteTimeout}
        raise kind.get(phase, httpx2.ReadTimeout)(f"{phase} timed out", request=request) from exc
    except (Http1Error, ValueError) as exc:
        raise httpx2.RemoteProtocolError(f"{phase}: {exc}", request=request) from exc
    except OSError as exc:
        failed = {"connect": httpx2.ConnectError, "write": httpx2.WriteError}
        raise failed.get(phase, httpx2.ReadError)(f"{phase}: {exc!r}", request=request) from exc


class _Watchdog:
    """A read deadline that each read renews, checked by one timer.

    When the node sends nothing for `timeout` seconds the connection is aborted, so
    the pending read ends; `fired` tells the reader to report a `ReadTimeout`.
    """

    __slots__ = ("_conn", "_handle", "_loop", "_timeout", "expires", "fired")

    def __init__(self, conn: _Conn, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._conn = conn
        self._timeout = timeout
        self.fired = False
        self.expires = self._loop.time() + timeout
        self._handle = self._loop.call_at(self.expires, self._check)

    def renew(self) -> None:
        self.expires = self._loop.time() + self._timeout

    def _check(self) -> None:
        if self._loop.time() < self.expires:
            self._handle = self._loop.call_at(self.expires, self._check)
            return
        self.fired = True
        self._conn.writer.transport.abort()

    def cancel(self) -> None:
        self._handle.cancel()


class Http11Transport(httpx2.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 to a set of nodes; idle connections kept per origin."""

    def __init__(self, *, max_idle_per_origin: int = 512, ssl_context: Any = None) -> None:
        self._idle: dict[Origin, list[_Conn]] = {}
        self._max_idle = max_idle_per_origin
        self._ssl = ssl_context or ssl.create_default_context()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        await request.aread()
        try:
            head = encode_request_head(request.method.encode(), url.raw_path, request.headers.raw)
        except Http1Error as exc:
            raise httpx2.LocalProtocolError(str(exc), request=request) from exc
        payload = head + request.content
        pooled = self._take(origin)
        if pooled is not None:
            try:
                return await self._exchange(request, origin, pooled, payload)
            except httpx2.RemoteProtocolError as exc:
                if not getattr(exc, "nothing_received", False):
                    raise
                # The node had closed this idle connection: it never saw the request.
        conn = await self._connect(request, origin)
        return await self._exchange(request, origin, conn, payload)

    def _take(self, origin: Origin) -> _Conn | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable:
                return conn
            conn.close()
        return None

    def _give_back(self, origin: Origin, conn: _Conn) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) < self._max_idle and conn.usable:
            idle.append(conn)
        else:
            conn.close()

    async def _connect(self, request: httpx2.Request, origin: Origin) -> _Conn:
        scheme, host, port = origin
        with _mapped(request, "connect"), anyio.fail_after(_timeout(request, "connect")):
            tls = self._ssl if scheme == "https" else None
            reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        return _Conn(reader, writer)

    async def _exchange(
        self, request: httpx2.Request, origin: Origin, conn: _Conn, payload: bytes
    ) -> httpx2.Response:
        read_timeout = _timeout(request, "read")
        watchdog = None if read_timeout is None else _Watchdog(conn, read_timeout)
        parser = ResponseParser(head_request=request.method == "HEAD")
        first: list[bytes] = []  # body bytes that arrived with the head
        try:
            with _mapped(request, "write"):
                conn.writer.write(payload)
                await conn.writer.drain()
            with _mapped(request, "read"):
                while parser.head is None:
                    data = await conn.reader.read(READ_SIZE)
                    if not data:
                        parser.feed_eof()  # raises: the head is incomplete
                    first = parser.feed(data)
            if watchdog is not None:
                watchdog.renew()
        except httpx2.TransportError as exc:
            conn.close()
            if watchdog is not None:
                watchdog.cancel()
                if watchdog.fired:
                    raise httpx2.ReadTimeout("read timed out", request=request) from exc
            exc.nothing_received = (  # type: ignore[attr-defined]
                isinstance(exc, httpx2.RemoteProtocolError) and not parser.started
            )
            raise
        except BaseException:
            conn.close()
            if watchdog is not None:
                watchdog.cancel()
            raise
        head = parser.head
        stream = _Body(self, origin, conn, request, parser, first, watchdog)
        return httpx2.Response(
            head.status,
            headers=head.headers,
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason},
        )

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


class _Body(httpx2.AsyncByteStream):
    """The response body, read as it arrives; the connection is reused only when complete."""

    def __init__(
        self,
        pool: Http11Transport,
        origin: Origin,
        conn: _Conn,
        request: httpx2.Request,
        parser: ResponseParser,
        first: list[bytes],
        watchdog: _Watchdog | None,
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._conn: _Conn | None = conn
        self._request = request
        self._parser = parser
        self._first = first
        self._watchdog = watchdog
        if parser.done and watchdog is not None:
            watchdog.cancel()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        first, self._first = self._first, []
        for data in first:
            yield data
        parser = self._parser
        if parser.done or self._conn is None:
            return
        reader = self._conn.reader
        try:
            with _mapped(self._request, "body"):
                while not parser.done:
                    data = await self._read(reader)
                    if not data:
                        if self._watchdog is not None and self._watchdog.fired:
                            raise TimeoutError
                        parser.feed_eof()
                    for piece in parser.feed(data):
                        yield piece
        except httpx2.TransportError as exc:
            if self._watchdog is not None and self._watchdog.fired:
                raise httpx2.ReadTimeout("body: read timed out", request=self._request) from exc
            raise
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def _read(self, reader: asyncio.StreamReader) -> bytes:
        data = await reader.read(READ_SIZE)
        if self._watchdog is not None:
            self._watchdog.renew()
        return data

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._parser.keep_alive:
            self._pool._give_back(self._origin, conn)
        else:
            conn.close()
