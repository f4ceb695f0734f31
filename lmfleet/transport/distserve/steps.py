"""The I/O a DistServe plan asks for, and the two drivers that perform it.

A DistServe request is several HTTP exchanges (prefill, pair connection, decode,
cache frees) with failover between them. That logic is written once, as a
generator that *yields* steps (`Call`, `Pause`, `WaitFor`, `Discard`) and
receives each step's result; `drive_sync` runs it in the caller's thread over
an `httpx2.BaseTransport`, `drive_async` in the caller's event loop over an
`httpx2.AsyncBaseTransport`. Neither driver knows anything about DistServe, so
the sync client, the async client and the proxy cannot drift apart.

Why the sync client connects pairs itself (rather than through the fleet's
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
from collections.abc import Generator
from dataclasses import dataclass
from typing import TypeVar

import anyio
import httpx2

T = TypeVar("T")

WAIT_POLL = 0.005
"""How often an async waiter looks at a pair being connected by someone else (seconds)."""


@dataclass(frozen=True, slots=True)
class Call:
    """Send `request`; read and close the body unless `stream` (then the plan owns it)."""

    request: httpx2.Request
    stream: bool = False


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
