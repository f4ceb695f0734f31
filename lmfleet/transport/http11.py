"""`Http11Transport`: a small HTTP/1.1 client transport for the proxy's upstream hop.

Profiling the proxy showed httpx2's general-purpose pool (connection bookkeeping
that is linear in open connections, URL re-parsing, several layers of stream
wrappers) taking three quarters of its CPU per request. Talking to a fleet node
needs far less: plain HTTP/1.1 over keep-alive connections, content-length or
chunked bodies. This transport does exactly that on asyncio streams and plugs
in under `AsyncFleetTransport` like any httpx2 transport, so routing, leasing and
failover stay the one shared implementation.

Errors are mapped onto httpx2's exception types (the router's failover rules
read them): refused or timed-out connects are `ConnectError` / `ConnectTimeout`,
a connection dropped before the response head is `RemoteProtocolError`, and so on.
A kept-alive connection that turns out to be closed by the node before any
response byte arrives is retried once on a new connection (the node never saw the
request).

Read timeouts are one lazily checked timer per exchange (`_Watchdog`), renewed by
each read, rather than a cancel scope around every read: on SSE that scope cost
more CPU than the rest of the relay. Chunked bodies are parsed from bulk reads,
so a burst of chunks that arrived together costs one read, not two per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx2

MAX_HEAD = 64 * 1024
READ_SIZE = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})

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
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise httpx2.RemoteProtocolError(f"{phase}: {exc!r}", request=request) from exc
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
        payload = self._head(request) + request.content
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

    @staticmethod
    def _head(request: httpx2.Request) -> bytes:
        lines = [request.method.encode(), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        return b"".join(lines)

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
            reader, writer = await asyncio.open_connection(host, port, ssl=tls, limit=MAX_HEAD)
        return _Conn(reader, writer)

    async def _exchange(
        self, request: httpx2.Request, origin: Origin, conn: _Conn, payload: bytes
    ) -> httpx2.Response:
        read_timeout = _timeout(request, "read")
        watchdog = None if read_timeout is None else _Watchdog(conn, read_timeout)
        try:
            with _mapped(request, "write"):
                conn.writer.write(payload)
                await conn.writer.drain()
            with _mapped(request, "read"):
                head = await conn.reader.readuntil(b"\r\n\r\n")
            if watchdog is not None:
                watchdog.renew()
            status, reason, headers, framing = _parse_head(request, head)
        except httpx2.TransportError as exc:
            conn.close()
            if watchdog is not None:
                watchdog.cancel()
                if watchdog.fired:
                    raise httpx2.ReadTimeout("read timed out", request=request) from exc
            cause = exc.__cause__
            exc.nothing_received = (  # type: ignore[attr-defined]
                isinstance(exc, httpx2.RemoteProtocolError)
                and isinstance(cause, asyncio.IncompleteReadError)
                and not cause.partial
            )
            raise
        except BaseException:
            conn.close()
            if watchdog is not None:
                watchdog.cancel()
            raise
        stream = _Body(self, origin, conn, request, framing, watchdog)
        return httpx2.Response(
            status,
            headers=headers,
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason},
        )

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


def _parse_head(
    request: httpx2.Request, head: bytes
) -> tuple[int, bytes, list[tuple[bytes, bytes]], tuple[str, int, bool]]:
    """Status, reason, headers and framing: ("length", n) / ("chunked", 0) / ("close", 0)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise httpx2.RemoteProtocolError(
            f"not an HTTP/1 response: {lines[0][:80]!r}", request=request
        )
    try:
        status = int(parts[1])
    except ValueError as exc:
        raise httpx2.RemoteProtocolError(f"bad status: {lines[0][:80]!r}", request=request) from exc
    headers: list[tuple[bytes, bytes]] = []
    length = -1
    chunked = False
    keep = parts[0] == b"HTTP/1.1"
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        value = value.strip()
        headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            length = int(value)
        elif lower == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif lower == b"connection":
            keep = value.lower() != b"close"
    if request.method == "HEAD" or status in _NO_BODY_STATUS or 100 <= status < 200:
        return status, parts[2] if len(parts) > 2 else b"", headers, ("length", 0, keep)
    if chunked:
        return status, parts[2] if len(parts) > 2 else b"", headers, ("chunked", 0, keep)
    if length >= 0:
        return status, parts[2] if len(parts) > 2 else b"", headers, ("length", length, keep)
    return status, parts[2] if len(parts) > 2 else b"", headers, ("close", 0, False)


class _Body(httpx2.AsyncByteStream):
    """The response body, read as it arrives; the connection is reused only when complete."""

    def __init__(
        self,
        pool: Http11Transport,
        origin: Origin,
        conn: _Conn,
        request: httpx2.Request,
        framing: tuple[str, int, bool],
        watchdog: _Watchdog | None,
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._conn: _Conn | None = conn
        self._request = request
        self._framing = framing
        self._reusable = framing[2]
        self._complete = framing[0] == "length" and framing[1] == 0
        self._watchdog = watchdog
        if self._complete and watchdog is not None:
            watchdog.cancel()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._complete or self._conn is None:
            return
        reader = self._conn.reader
        kind, remaining, _ = self._framing
        try:
            with _mapped(self._request, "body"):
                if kind == "length":
                    while remaining > 0:
                        data = await self._read(reader, min(remaining, READ_SIZE))
                        if not data:
                            raise asyncio.IncompleteReadError(b"", remaining)
                        remaining -= len(data)
                        yield data
                elif kind == "chunked":
                    async for data in self._chunks(reader):
                        yield data
                else:
                    while data := await self._read(reader, READ_SIZE):
                        yield data
                    if self._watchdog is not None and self._watchdog.fired:
                        raise asyncio.IncompleteReadError(b"", None)
        except httpx2.TransportError as exc:
            if self._watchdog is not None and self._watchdog.fired:
                raise httpx2.ReadTimeout("body: read timed out", request=self._request) from exc
            raise
        self._complete = True
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def _read(self, reader: asyncio.StreamReader, size: int) -> bytes:
        data = await reader.read(size)
        if self._watchdog is not None:
            self._watchdog.renew()
        return data

    async def _chunks(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        """Decode a chunked body from bulk reads: every chunk already received, in order."""
        buf = b""
        while True:
            data = await self._read(reader, READ_SIZE)
            if not data:
                raise asyncio.IncompleteReadError(buf, None)
            buf = buf + data if buf else data
            pos = 0
            while (line_end := buf.find(b"\r\n", pos)) >= 0:
                size = int(buf[pos:line_end].split(b";", 1)[0], 16)
                if size == 0:  # the last chunk, then trailers (if any) and an empty line
                    end = buf.find(b"\r\n\r\n", line_end)
                    if end < 0:
                        break
                    if end + 4 < len(buf):
                        self._reusable = False  # bytes after the body: do not trust the connection
                    return
                start = line_end + 2
                stop = start + size
                if len(buf) < stop + 2:
                    break
                if buf[stop : stop + 2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                yield buf[start:stop]
                pos = stop + 2
            buf = buf[pos:]

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._complete and self._reusable:
            self._pool._give_back(self._origin, conn)
        else:
            conn.close()
