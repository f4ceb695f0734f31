"""The proxy's front door: HTTP/1.1 read and written directly on an asyncio protocol.

uvicorn serves the proxy's ASGI app (lifespan, TLS, the socket, the graceful
shutdown), but each connection starts with this protocol instead of uvicorn's own
(`uvicorn.Config(http=FrontDoor)`). What it saves per request, on the paths every
caller takes (measured in docs/benchmarks.md, "The front door"):

- one write per sized answer: the head waits for the body and both leave in one
  `transport.write` (uvicorn writes them apart: two `send` system calls, and on a
  VM a system call is a good part of what a proxied request costs);
- the request parsed by one `bytes.find` and a split per header line, no parser
  callbacks, and an ASGI cycle without the machinery for what the proxy never
  sees from its callers (pipelining queues, WebSocket upgrades).

A request it does not take is handed over, with the connection, to uvicorn's own
protocol at the request's first byte: a chunked request body, `Expect:
100-continue`, an upgrade, `HEAD`, HTTP/1.0, a head it cannot read (uvicorn
answers that one with its 400). The connection then stays with uvicorn. So every HTTP/1.1
feature still works, and the common case (a JSON body of declared length, kept-alive
connections) takes the short way.

A POST to a plain route (chat, completions) goes first to the fast lane
(lmfleet/proxy/fast_lane.py), once its body is in: the lane answers through the
`Cycle`'s own writes (`whole`, `stream`, `pieces`) or hands the request, nothing
sent, to the ASGI app. A caller who leaves while the lane serves it has the lane's
task cancelled at once.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol

from uvicorn.config import Config
from uvicorn.server import ServerState

from lmfleet.proxy.asgi import Message, Scope
from lmfleet.proxy.context import FAST_LANE
from lmfleet.transport.router import PLAIN_PATHS
from lmfleet.wire.deadline import Deadline

log = logging.getLogger("uvicorn.error")
access_log = logging.getLogger("uvicorn.access")

MAX_HEAD = 64 * 1024
"""Bytes of request line and headers read before the request is handed over (uvicorn
then answers 431/400 as it does for any request)."""

READ_AHEAD = 256 * 1024
"""Bytes of the next requests buffered while one is answered; beyond, reading pauses."""

MAX_SKIP = 1024 * 1024
"""Body bytes still to come that a connection answered before them reads and drops to
stay open (as uvicorn's protocol does); beyond, the answer says `connection: close`."""

HANDED_OVER = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
"""Request headers that send the request to uvicorn's protocol."""

ASGI = {"version": "3.0", "spec_version": "2.3"}


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


STATUS_LINES = {status.value: _status_line(status.value) for status in http.HTTPStatus}


class _Head:
    """One parsed request head."""

    __slots__ = (
        "headers",
        "keep_alive",
        "length",
        "method",
        "path",
        "query",
        "raw_path",
    )

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.length = 0
        self.keep_alive = True
        self.method = ""
        self.raw_path = b""
        self.path = ""
        self.query = b""


def parse_head(head: bytes) -> _Head | None:
    """The request head (without its blank line), or None for one this door does not
    take (uvicorn's protocol then reads it, and answers it if it is malformed)."""
    lines = head.split(b"\r\n")
    breaks = len(lines) - 1
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks or b"\0" in head:
        return None  # a bare CR or LF, a NUL (header injection): uvicorn's 400
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        return None  # HTTP/1.0 (no chunked answers, other keep-alive rules): uvicorn's
    method, target, _ = parts
    if method not in (b"GET", b"POST", b"DELETE", b"PUT", b"PATCH", b"OPTIONS"):
        return None  # HEAD (a body that is not sent) and the rare ones: uvicorn's
    if not target.startswith(b"/"):
        return None
    found = _Head()
    found.method = method.decode("ascii")
    raw_path, _, found.query = target.partition(b"?")
    if b"%" in raw_path:
        return None  # percent-decoding: uvicorn's
    found.raw_path = raw_path
    try:
        found.path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        return None
    length: int | None = None
    headers = found.headers
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b" " in name:
            return None
        name = name.lower()
        value = value.strip(b" \t")
        if name in HANDED_OVER:
            return None
        if name == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                return None
            length = int(value)
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"close" in tokens:
                found.keep_alive = False
        headers.append((name, value))
    found.length = length or 0
    return found


class Lane(Protocol):
    """Where the door sends plain requests first (lmfleet/proxy/fast_lane.py)."""

    max_body: int
    """Bodies above this go to the app (its 413)."""
    body_timeout: float
    """Seconds a held request's body may take to arrive."""

    async def serve(self, scope: Scope, cycle: Cycle, body: bytes) -> bool:
        """Answer the request, or False (nothing sent) for the app to take it."""
        ...

    async def late(self, scope: Scope, cycle: Cycle) -> None:
        """Answer a request whose body missed `body_timeout`."""
        ...


class Cycle:
    """One request and its answer: the ASGI `receive` and `send` of one exchange, or
    the fast lane's writes."""

    __slots__ = (
        "_arrived",
        "_body_done",
        "_chunks",
        "_door",
        "_head",
        "_length",
        "_started",
        "complete",
        "gone",
        "keep_alive",
        "left",
        "status",
        "task",
        "waiting",
    )

    def __init__(self, door: FrontDoor, length: int, keep_alive: bool) -> None:
        self._door = door
        self.left = length
        """Body bytes still to come from the caller."""
        self._chunks: list[bytes] = []
        self._arrived: asyncio.Event | None = None
        self.keep_alive = keep_alive
        self._started = False
        self._head = b""
        """The answer's head while it waits for the first body bytes (a sized answer)."""
        self._length: int | None = None
        """The answer's declared length (None: chunked)."""
        self._body_done = False
        """Every body message was received (the next `receive` waits for the end)."""
        self.complete = False
        self.gone = False
        self.status = 0
        self.task: asyncio.Task[None] | None = None
        """The fast lane's task while it serves this request: cancelled when the caller
        goes (the pipeline notices by its own sweep: lmfleet/proxy/exchanges.py)."""
        self.waiting: tuple[Lane, Scope] | None = None
        """A request for the fast lane whose body is still coming (no task yet)."""

    # -- the caller's body ------------------------------------------------------

    def take(self, data: bytes | bytearray) -> int:
        """Body bytes from the connection; how many of `data` belonged to the body."""
        used = min(self.left, len(data))
        if used:
            self._chunks.append(bytes(data[:used]))
            self.left -= used
            if self._arrived is not None:
                self._arrived.set()
        return used

    def wake(self) -> None:
        """The caller went away, or the answer is complete: wake a waiting `receive`."""
        if self._arrived is not None:
            self._arrived.set()

    def body(self) -> bytes:
        """The whole body, once it is in (`left` is 0), kept for `receive`."""
        chunks = self._chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def receive(self) -> Message:
        while True:
            if self._chunks:
                body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._body_done = self.left == 0
                return {"type": "http.request", "body": body, "more_body": not self._body_done}
            if self.gone:
                return {"type": "http.disconnect"}
            if self.left == 0 and not self._body_done:  # an empty body: one empty message
                self._body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if self.complete:
                return {"type": "http.disconnect"}
            if self._arrived is None:
                self._arrived = asyncio.Event()
            self._arrived.clear()
            if self.left:
                self._door.want_body()
            await self._arrived.wait()

    # -- the answer -------------------------------------------------------------

    async def send(self, message: Message) -> None:
        door = self._door
        if door.writing is not None:
            await door.writing.wait()
        if self.gone:
            return
        if not self._started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {message['type']!r}")
            self._start(int(message["status"]), message.get("headers", ()))
            return
        if self.complete or message["type"] != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {message['type']!r}")
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self._length is None:  # chunked
            out = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more:
                out += b"0\r\n\r\n"
        else:
            if len(body) > self._length:
                raise RuntimeError("response content longer than content-length")
            self._length -= len(body)
            if not more and self._length:
                raise RuntimeError("response content shorter than content-length")
            out = body
        if self._head:
            out = self._head + out
            self._head = b""
        if out:
            door.transport.write(out)
        if not more:
            self._finish()

    def _start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self._started = True
        if self.left > MAX_SKIP:  # answered before a big body came: close, not read it all
            self.keep_alive = False
        self.status = status
        line = STATUS_LINES.get(status) or _status_line(status)
        parts = [line]
        said_close = False
        for name, value in (*self._door.default_headers, *headers):
            lower = name.lower()
            if lower == b"content-length":
                self._length = int(value)
            elif lower == b"transfer-encoding":
                continue  # chunked below, when no length is given
            elif lower == b"connection" and b"close" in value.lower():
                self.keep_alive = False
                said_close = True
            parts += (name, b": ", value, b"\r\n")
        if self._length is None:
            if status in (204, 304) or status < 200:
                self._length = 0
            else:
                parts.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive and not said_close:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        if self._length is None:
            self._door.transport.write(head)  # a stream: its head now, not with its first event
        else:
            self._head = head

    # -- the answer, written by the fast lane (lmfleet/proxy/fast_lane.py) ----------

    async def writable(self) -> bool:
        """Wait while the caller's connection pushes back; False once the caller is gone."""
        writing = self._door.writing
        if writing is not None and not writing.is_set():
            await writing.wait()
        return not self.gone

    def whole(self, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole answer: head and body in one write (`headers` give its length)."""
        if self.gone:
            return
        self._start(status, headers)
        out, self._head = self._head + body, b""
        self._door.transport.write(out)
        self._finish()

    def stream(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Start an answer of unknown length (chunked): its head goes now."""
        if not self.gone:
            self._start(status, headers)

    def pieces(self, pieces: list[bytes], *, last: bool = False) -> None:
        """Body pieces of a streamed answer, in one write; `last` ends the answer."""
        if self.gone:
            return
        out = b"".join([b"%x\r\n%b\r\n" % (len(p), p) for p in pieces if p])
        if last:
            out += b"0\r\n\r\n"
        if out:
            self._door.transport.write(out)
        if last:
            self._finish()

    def drop(self) -> None:
        """End an answer that cannot be completed: the connection is closed."""
        if not self.gone:
            self._door.transport.close()

    def _finish(self) -> None:
        self.complete = True
        self.wake()
        self._door.answered(self)

    async def fail(self) -> None:
        """The app raised, or returned without answering: a 500 if nothing was sent,
        else the connection is closed (the answer cannot be completed)."""
        if self.gone:
            return
        if not self._started:
            self.keep_alive = False
            head = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21")]
            await self.send({"type": "http.response.start", "status": 500, "headers": head})
            await self.send({"type": "http.response.body", "body": b"Internal Server Error"})
        elif not self.complete:
            self._door.transport.close()


class FrontDoor(asyncio.Protocol):
    """The protocol each caller's connection starts with (see the module docstring).

    Built by uvicorn with its config, server state and the lifespan's state, like its
    own protocols; it registers with the server's connections and tasks so that
    uvicorn's graceful shutdown waits for its requests as for any other."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config = config
        self.app: Callable[..., Awaitable[None]] = config.loaded_app
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.default_headers = server_state.default_headers
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buffer = bytearray()
        self.cycle: Cycle | None = None
        self.writing: asyncio.Event | None = None
        """Set while the transport accepts writes; None when it never pushed back."""
        self._reading = True
        self._skip = 0
        """Body bytes of an answered request still to come, dropped as they arrive."""
        self._idle = Deadline(self.loop, self._idle_timeout)
        """When the connection closes unless a whole request head came; disarmed while
        a request is served (moved on with each answer: lmfleet/wire/deadline.py)."""
        self._body_wait = Deadline(self.loop, self._body_late)
        """While a request held for the fast lane waits for its body (`Cycle.waiting`)."""
        self._closing = False
        self._server: tuple[str, int] | None = None
        self._client: tuple[str, int] | None = None
        self._scheme = "http"

    # -- the connection ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server_state.connections.add(self)  # type: ignore[arg-type]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                self._server = sock.getsockname()[:2]
                self._client = sock.getpeername()[:2]
            except OSError:
                pass
        self._scheme = "https" if transport.get_extra_info("sslcontext") else "http"
        self._idle.arm(self.config.timeout_keep_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._idle.stop()
        self._body_wait.stop()
        cycle = self.cycle
        if cycle is not None and not cycle.complete:
            cycle.gone = True
            cycle.wake()
            if cycle.task is not None:
                cycle.task.cancel()
        if self.writing is not None:
            self.writing.set()

    def eof_received(self) -> bool | None:
        return None  # close: a caller that half-closes is gone

    def pause_writing(self) -> None:
        if self.writing is None:
            self.writing = asyncio.Event()
        self.writing.clear()

    def resume_writing(self) -> None:
        if self.writing is not None:
            self.writing.set()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close now if idle, else after this answer."""
        self._closing = True
        if self.cycle is None:
            self.transport.close()
        else:
            self.cycle.keep_alive = False

    # -- requests ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._skip:  # the rest of a body answered without being read
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
            if not data:
                return
        cycle = self.cycle
        if cycle is not None and cycle.left:
            used = cycle.take(data)
            if not cycle.left and cycle.waiting is not None:
                self._body_in(cycle)
            if used == len(data):
                return
            data = data[used:]
        self.buffer += data
        if self.cycle is None:
            self._next()
        elif len(self.buffer) > READ_AHEAD and self._reading:
            self._reading = False
            self.transport.pause_reading()

    def want_body(self) -> None:
        """A `receive` waits for body bytes: read even when the buffer is full."""
        if not self._reading:
            self._reading = True
            self.transport.resume_reading()

    def _next(self) -> None:
        """Start the buffered request, if its head is in."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._hand_over()
            return
        head = parse_head(bytes(buffer[:end]))
        if head is None:
            self._hand_over()
            return
        del buffer[: end + 4]
        self._idle.disarm()  # armed while idle or reading a head: a head must come whole in time
        cycle = self.cycle = Cycle(self, head.length, head.keep_alive and not self._closing)
        if cycle.left and buffer:
            used = cycle.take(buffer)
            del buffer[:used]
        scope: Scope = {
            "type": "http",
            "asgi": ASGI,
            "http_version": "1.1",
            "server": self._server,
            "client": self._client,
            "scheme": self._scheme,
            "method": head.method,
            "root_path": "",
            "path": head.path,
            "raw_path": head.raw_path,
            "query_string": head.query,
            "headers": head.headers,
            "state": self.app_state.copy(),
        }
        lane: Lane | None = self.app_state.get(FAST_LANE)
        if (
            lane is not None
            and head.method == "POST"
            and head.path in PLAIN_PATHS
            and head.length <= lane.max_body  # else the pipeline's 413, before the body
        ):
            if cycle.left:  # the lane starts once the body is in (`data_received`)
                cycle.waiting = (lane, scope)
                self._body_wait.arm(lane.body_timeout)
                return
            cycle.task = self._start(self._fast(lane, scope, cycle))
        else:
            self._start(self._run(scope, cycle))

    def _start(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Serve a request in its own task, which uvicorn's shutdown waits for."""
        task = self.loop.create_task(work)
        tasks = self.server_state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    def _body_in(self, cycle: Cycle) -> None:
        """The body of a request held for the fast lane is in: the lane takes it."""
        self._body_wait.disarm()
        assert cycle.waiting is not None
        (lane, scope), cycle.waiting = cycle.waiting, None
        cycle.task = self._start(self._fast(lane, scope, cycle))

    def _body_late(self) -> None:
        """A request held for the fast lane missed `body_timeout`: its 408, as the
        pipeline's (the rest of its body is not read: the connection closes)."""
        cycle = self.cycle
        if cycle is None or cycle.waiting is None or cycle.gone:
            return
        (lane, scope), cycle.waiting = cycle.waiting, None
        cycle.keep_alive = False
        self._start(lane.late(scope, cycle))

    async def _fast(self, lane: Lane, scope: Scope, cycle: Cycle) -> None:
        """A plain request: the fast lane answers it, or hands it to the app (nothing
        sent yet; `scope` then says what the lane tried)."""
        try:
            taken = await lane.serve(scope, cycle, cycle.body())
        except Exception as exc:
            log.error("Exception in the proxy's fast lane\n", exc_info=exc)
            await cycle.fail()
            taken = True
        except BaseException:  # the caller went away, or a forced shutdown
            if not cycle.complete:
                self.transport.close()
            raise
        if taken:
            self._log(scope, cycle)
        else:
            cycle.task = None  # the pipeline watches for the caller its own way
            await self._run(scope, cycle)

    async def _run(self, scope: Scope, cycle: Cycle) -> None:
        try:
            await self.app(scope, cycle.receive, cycle.send)
        except Exception as exc:
            log.error("Exception in ASGI application\n", exc_info=exc)
            await cycle.fail()
        except BaseException:  # cancelled (a forced shutdown): nothing more can be sent
            if not cycle.complete:
                self.transport.close()
            raise
        else:
            if not cycle.complete and not cycle.gone:
                log.error("ASGI callable returned without completing the response.")
                await cycle.fail()
        self._log(scope, cycle)

    def _log(self, scope: Scope, cycle: Cycle) -> None:
        """The access log's line for an answered request (uvicorn's format)."""
        if self.config.access_log and cycle.status:
            query = scope["query_string"]
            path = scope["path"] + ("?" + query.decode("ascii") if query else "")
            client = f"{self._client[0]}:{self._client[1]}" if self._client else ""
            access_log.info(
                '%s - "%s %s HTTP/%s" %d',
                client,
                scope["method"],
                path,
                scope["http_version"],
                cycle.status,
            )

    def answered(self, cycle: Cycle) -> None:
        """The answer's last bytes are written: keep the connection for the next."""
        self.server_state.total_requests += 1
        if not cycle.keep_alive:
            self.transport.close()
            return
        self._skip = cycle.left  # answered before its body was read (a 401, a 413)
        self.cycle = None
        if not self._reading:
            self._reading = True
            self.transport.resume_reading()
        self._idle.arm(self.config.timeout_keep_alive)
        if self.buffer:
            self._next()

    def _hand_over(self) -> None:
        """Give the connection, with what it sent since the last answer, to uvicorn's
        own protocol; it keeps it from now on."""
        self._idle.stop()
        self.server_state.connections.discard(self)
        protocol = _uvicorn_protocol()(
            config=self.config,
            server_state=self.server_state,
            app_state=self.app_state,
            _loop=self.loop,
        )
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if not self._reading:
            self._reading = True
            self.transport.resume_reading()
        data, self.buffer = bytes(self.buffer), bytearray()
        protocol.data_received(data)

    # -- the idle connection ----------------------------------------------------

    def _idle_timeout(self) -> None:
        """`timeout_keep_alive` (uvicorn's setting, 5 s) since the connection opened or
        its last answer, and no whole request head: closed (a head sent byte by byte
        holds nothing open)."""
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()


def _uvicorn_protocol() -> Callable[..., asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol: httptools' when installed (lmfleet[serve]), else h11's."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol
