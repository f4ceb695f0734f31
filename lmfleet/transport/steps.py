"""The I/O a request plan asks for, and the two drivers that perform it.

Every request's way through the fleet (lease a node, send, judge the answer,
fail over, wait for a node; for DistServe also prefill, pair connection, decode
and cache frees) is written once, as a generator that *yields* steps (`Call`,
`Pause`, `WaitFor`, `Discard`) and receives each step's result; `drive_sync`
runs it in the caller's thread over an `httpx2.BaseTransport`, `drive_async` in
the caller's event loop over an `httpx2.AsyncBaseTransport`. Neither driver
knows anything about routing, so the sync client, the async client and the
proxy cannot drift apart.

A `Call` with `first_byte=True` also waits for the first body byte of an
unsized (streamed) answer before handing it back: a hung engine sends a
streaming response's head at once and then nothing, and only while no byte has
reached the caller can the plan still send the request elsewhere. That byte is
kept and replayed first (`Primed*Stream`); the wait is bounded by the request's
read timeout, which the plan sets to the first-byte timeout.

Why the sync client connects DistServe pairs itself (rather than through the fleet's
background portal): the connect calls are ordinary HTTP exchanges that the
caller's inner transport already knows how to make, with a timeout each; a
portal hop would block the caller's thread anyway and would tie a pair's
connection to the fleet loop's liveness. Deduplication does not need one loop:
the pair table is guarded by a thread lock and waiters block on (sync) or poll
(async, any event loop) a `threading.Event`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx2

from lmfleet.doorbell import Doorbell
from lmfleet.transport.read_bound import read_bound

T = TypeVar("T")

WAIT_POLL = 0.005
"""How often an async waiter looks at a pair being connected by someone else (seconds)."""


@dataclass(frozen=True, slots=True)
class Call:
    """Send `request`; read and close the body unless `stream` (then the plan owns it).

    `first_byte`: with `stream`, also wait for an unsized answer's first body byte.
    """

    request: httpx2.Request
    stream: bool = False
    first_byte: bool = False


@dataclass(frozen=True, slots=True)
class Pause:
    """Wait `seconds`; with a `bell`, less when it rings after its `seen` rings."""

    seconds: float
    bell: Doorbell | None = None
    seen: int = 0


@dataclass(frozen=True, slots=True)
class WaitFor:
    """Wait until `event` is set or `timeout` seconds pass."""

    event: threading.Event
    timeout: float


@dataclass(frozen=True, slots=True)
class Discard:
    """Close a streamed response the plan will not hand back."""

    response: httpx2.Response


@dataclass(frozen=True, slots=True)
class Read:
    """The next chunk of a streamed response (`Call(stream=True)`): bytes, `b""` at
    its end, or the transport error it raised. `timeout`: seconds to wait for it
    (None: the request's own read timeout only); past it, an `httpx2.ReadTimeout`."""

    response: httpx2.Response
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Emit:
    """Hand `chunk` to the caller: only in the steps of a response body (`StepsBody`)."""

    chunk: bytes


Step = Call | Pause | WaitFor | Discard | Read | Emit
Reply = httpx2.Response | httpx2.TransportError | bytes | None
"""A `Call` gets the response or the transport error it raised, a `Read` a chunk or
the error; other steps get None."""
Steps = Generator[Step, Reply, T]


class StepsBody(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """A response body made by steps: a plan that must go on talking to nodes after
    its answer started (a generation continued on another node) returns a response
    with this body; the driver that ran the plan binds it to its own transport, and
    the body's steps run as the caller reads it, each `Emit` one chunk."""

    def __init__(self, steps: Steps[None]) -> None:
        self.steps = steps
        self._inner: httpx2.BaseTransport | httpx2.AsyncBaseTransport | None = None
        self._body: Any = None  # the running body (a generator), closed with this one

    def __iter__(self) -> Iterator[bytes]:
        assert isinstance(self._inner, httpx2.BaseTransport), "bound by drive_sync"
        self._body = _body_sync(self.steps, self._inner)
        yield from self._body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert isinstance(self._inner, httpx2.AsyncBaseTransport), "bound by drive_async"
        self._body = _body_async(self.steps, self._inner)
        async for chunk in self._body:
            yield chunk

    def close(self) -> None:
        """Close the body now (its node responses with it), read to its end or not."""
        if self._body is not None:
            self._body.close()
        self.steps.close()

    async def aclose(self) -> None:
        if self._body is not None:
            with contextlib.suppress(RuntimeError):  # ended by an exception thrown into it
                await self._body.aclose()
        self.steps.close()


def _bind(result: T, inner: httpx2.BaseTransport | httpx2.AsyncBaseTransport) -> T:
    """A plan's answer, its body bound to `inner` when steps make it."""
    if isinstance(result, httpx2.Response) and isinstance(result.stream, StepsBody):
        result.stream._inner = inner
    return result


SyncReading = dict[int, tuple[httpx2.Response, Iterator[bytes]]]
AsyncReading = dict[int, tuple[httpx2.Response, AsyncIterator[bytes]]]
"""The responses a driver's `Read` steps are reading, by id: each one's iterator."""


def drive_sync(steps: Steps[T], inner: httpx2.BaseTransport) -> T:
    """Run `steps` in this thread; the generator is closed however this ends."""
    reply: Reply = None
    reading: SyncReading = {}
    try:
        while True:
            try:
                step = steps.send(reply)
            except StopIteration as stop:
                return _bind(stop.value, inner)  # type: ignore[no-any-return]
            if isinstance(step, Emit):
                raise RuntimeError("Emit outside a response body")
            reply = _one_sync(step, inner, reading)
    finally:
        steps.close()
        _close_sync(reading)


async def drive_async(steps: Steps[T], inner: httpx2.AsyncBaseTransport) -> T:
    """Run `steps` in the running event loop; the generator is closed however this ends."""
    reply: Reply = None
    reading: AsyncReading = {}
    try:
        while True:
            try:
                step = steps.send(reply)
            except StopIteration as stop:
                return _bind(stop.value, inner)  # type: ignore[no-any-return]
            if isinstance(step, Emit):
                raise RuntimeError("Emit outside a response body")
            reply = await _one_async(step, inner, reading)
    finally:
        steps.close()
        await _close_async(reading)


def _one_sync(step: Step, inner: httpx2.BaseTransport, reading: SyncReading) -> Reply:
    """Perform one step but `Emit` in this thread; its reply."""
    if isinstance(step, Call):
        try:
            response = inner.handle_request(step.request)
            if not step.stream:
                try:
                    response.read()
                finally:
                    response.close()
            elif step.first_byte and _unsized(response):
                _prime_sync(response)
            return response
        except httpx2.TransportError as exc:
            return exc
    if isinstance(step, Read):
        return _read_sync(step, reading)
    if isinstance(step, Pause):
        if step.bell is None:
            time.sleep(step.seconds)
        else:
            step.bell.wait(step.seen, step.seconds)
    elif isinstance(step, WaitFor):
        step.event.wait(step.timeout)
    elif isinstance(step, Discard):
        step.response.close()
    else:
        raise RuntimeError(f"{step!r} is not for this driver")
    return None


async def _one_async(step: Step, inner: httpx2.AsyncBaseTransport, reading: AsyncReading) -> Reply:
    """Perform one step but `Emit` in the running loop; its reply."""
    if isinstance(step, Call):
        try:
            response = await inner.handle_async_request(step.request)
            if not step.stream:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
            elif step.first_byte and _unsized(response):
                await _prime_async(response)
            return response
        except httpx2.TransportError as exc:
            return exc
    if isinstance(step, Read):
        return await _read_async(step, reading)
    if isinstance(step, Pause):
        if step.bell is None:
            await anyio.sleep(step.seconds)
        else:
            await step.bell.wait_async(step.seen, step.seconds)
    elif isinstance(step, WaitFor):
        deadline = time.monotonic() + step.timeout
        while not step.event.is_set() and time.monotonic() < deadline:
            await anyio.sleep(WAIT_POLL)
    elif isinstance(step, Discard):
        await step.response.aclose()
    else:
        raise RuntimeError(f"{step!r} is not for this driver")
    return None


def _close_sync(reading: SyncReading) -> None:
    """Close every response a `Read` opened that the steps left open."""
    for response, _ in reading.values():
        response.close()


async def _close_async(reading: AsyncReading) -> None:
    for response, _ in reading.values():
        await response.aclose()


# -- response bodies made by steps ---------------------------------------------------


def _read_sync(step: Read, reading: SyncReading) -> bytes | httpx2.TransportError:
    """The next chunk of `step.response`; its socket reads bounded by `step.timeout`
    where the connection reads through `BoundedReads` (the fleet's sync clients),
    else by the request's read timeout only."""
    key = id(step.response)
    if key not in reading:
        stream = step.response.stream
        assert isinstance(stream, httpx2.SyncByteStream)
        reading[key] = (step.response, iter(stream))
    chunks = reading[key][1]
    try:
        with read_bound(step.timeout):
            return next(chunks, b"")
    except httpx2.TransportError as exc:
        return exc


async def _read_async(step: Read, reading: AsyncReading) -> bytes | httpx2.TransportError:
    key = id(step.response)
    if key not in reading:
        stream = step.response.stream
        assert isinstance(stream, httpx2.AsyncByteStream)
        reading[key] = (step.response, stream.__aiter__())
    chunks = reading[key][1]
    try:
        if step.timeout is None:
            return await chunks.__anext__()
        with anyio.fail_after(step.timeout):
            return await chunks.__anext__()
    except StopAsyncIteration:
        return b""
    except TimeoutError:
        return httpx2.ReadTimeout(f"no chunk within {step.timeout:g} s")
    except httpx2.TransportError as exc:
        return exc


def _body_sync(steps: Steps[None], inner: httpx2.BaseTransport) -> Iterator[bytes]:
    """Run a body's steps as its reader iterates; yield each `Emit`."""
    reply: Reply = None
    reading: SyncReading = {}
    try:
        while True:
            try:
                step = steps.send(reply)
            except StopIteration:
                return
            if isinstance(step, Emit):
                reply = None
                yield step.chunk
            else:
                reply = _one_sync(step, inner, reading)
    finally:
        steps.close()
        _close_sync(reading)


async def _body_async(steps: Steps[None], inner: httpx2.AsyncBaseTransport) -> AsyncIterator[bytes]:
    reply: Reply = None
    reading: AsyncReading = {}
    try:
        while True:
            try:
                step = steps.send(reply)
            except StopIteration:
                return
            if isinstance(step, Emit):
                reply = None
                yield step.chunk
            else:
                reply = await _one_async(step, inner, reading)
    finally:
        steps.close()
        await _close_async(reading)


# -- first byte ---------------------------------------------------------------------


def _unsized(response: httpx2.Response) -> bool:
    """An open body of unknown size (chunked, SSE): its head may come long before it."""
    return not response.is_closed and "content-length" not in response.headers


class PrimedStream(httpx2.SyncByteStream):
    """A body whose first chunk was already read: that chunk, then the rest."""

    def __init__(self, first: bytes | None, rest: Iterator[bytes], inner: httpx2.SyncByteStream):
        self._first = first
        self._rest = rest
        self._inner = inner

    def __iter__(self) -> Iterator[bytes]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        yield from self._rest

    def close(self) -> None:
        self._inner.close()


class PrimedAsyncStream(httpx2.AsyncByteStream):
    """The async twin of `PrimedStream`."""

    def __init__(
        self, first: bytes | None, rest: AsyncIterator[bytes], inner: httpx2.AsyncByteStream
    ):
        self._first = first
        self._rest = rest
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


def _prime_sync(response: httpx2.Response) -> None:
    stream = response.stream
    assert isinstance(stream, httpx2.SyncByteStream)
    rest = iter(stream)
    try:
        first = next(rest, None)
    except BaseException:
        response.close()
        raise
    response.stream = PrimedStream(first, rest, stream)


async def _prime_async(response: httpx2.Response) -> None:
    stream = response.stream
    assert isinstance(stream, httpx2.AsyncByteStream)
    rest = stream.__aiter__()
    try:
        first: bytes | None = await rest.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await response.aclose()
        raise
    response.stream = PrimedAsyncStream(first, rest, stream)
