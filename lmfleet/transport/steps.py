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

import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from typing import TypeVar

import anyio
import httpx2

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
    seconds: float


@dataclass(frozen=True, slots=True)
class WaitFor:
    """Wait until `event` is set or `timeout` seconds pass."""

    event: threading.Event
    timeout: float


@dataclass(frozen=True, slots=True)
class Discard:
    """Close a streamed response the plan will not hand back."""

    response: httpx2.Response


Step = Call | Pause | WaitFor | Discard
Reply = httpx2.Response | httpx2.TransportError | None
"""A `Call` gets the response or the transport error it raised; other steps get None."""
Steps = Generator[Step, Reply, T]


def drive_sync(steps: Steps[T], inner: httpx2.BaseTransport) -> T:
    """Run `steps` in this thread; the generator is closed however this ends."""
    reply: Reply = None
    try:
        while True:
            try:
                step = steps.send(reply)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            reply = None
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
                    reply = response
                except httpx2.TransportError as exc:
                    reply = exc
            elif isinstance(step, Pause):
                time.sleep(step.seconds)
            elif isinstance(step, WaitFor):
                step.event.wait(step.timeout)
            else:
                step.response.close()
    finally:
        steps.close()


async def drive_async(steps: Steps[T], inner: httpx2.AsyncBaseTransport) -> T:
    """Run `steps` in the running event loop; the generator is closed however this ends."""
    reply: Reply = None
    try:
        while True:
            try:
                step = steps.send(reply)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            reply = None
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
                    reply = response
                except httpx2.TransportError as exc:
                    reply = exc
            elif isinstance(step, Pause):
                await anyio.sleep(step.seconds)
            elif isinstance(step, WaitFor):
                deadline = time.monotonic() + step.timeout
                while not step.event.is_set() and time.monotonic() < deadline:
                    await anyio.sleep(WAIT_POLL)
            else:
                await step.response.aclose()
    finally:
        steps.close()


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
