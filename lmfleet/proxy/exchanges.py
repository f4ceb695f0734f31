"""The proxy's open exchanges, looked after by one task: a late body, a caller gone.

Every forwarded request runs in one cancel scope (an `Exchange`). Two things may
cut it short: a body that takes longer than `body_timeout` to arrive (answered
408), and a caller that disconnects while its request waits for a node or its
answer is being made (its request leaves the admission queue, or the node's slot
is freed; nobody is answered). Neither needs a timer per request: one task per
proxy (`Exchanges`) looks at the open exchanges every `SWEEP_EVERY` seconds. A
timer per request cost the non-streamed proxy about 5 % of its throughput (a
`fail_after` for the body and a `call_later` for the watch: two timer handles, a
context manager and a second cancel scope), the sweep a set insert and removal.

The disconnect watch is a task that reads the next ASGI message (with the body
read, it can only be the disconnect). It starts only for an exchange that has
run `WATCH_AFTER` seconds: a watching task costs about 70 µs of CPU per request,
which fast answers would pay for nothing. A caller that goes away is noticed
within `WATCH_AFTER + SWEEP_EVERY` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

import anyio

from lmfleet.proxy.asgi import Receive

WATCH_AFTER = 0.5
"""Seconds an exchange runs before its disconnect watch starts."""

SWEEP_EVERY = 0.25
"""Seconds between two looks at the open exchanges (the precision of both bounds)."""


class Exchange:
    """One request's exchange: a cancel scope, its body deadline, its watch.

    Enter it before reading the body; call `body_read()` once the body is in. After
    the `with` block, `gone` says the caller went away and `body_late` that its
    body missed the deadline (the scope caught either cancellation)."""

    __slots__ = ("_owner", "_receive", "_watch", "body_deadline", "body_late", "scope", "started")

    def __init__(self, owner: Exchanges, receive: Receive, body_timeout: float) -> None:
        self._owner = owner
        self._receive = receive
        self._watch: asyncio.Task[None] | None = None
        self.started = time.monotonic()
        self.body_deadline = self.started + body_timeout
        self.body_late = False
        self.scope = anyio.CancelScope()

    def __enter__(self) -> Exchange:
        self.scope.__enter__()
        self._owner.add(self)
        return self

    def __exit__(self, *exc_info: Any) -> bool:
        self._owner.discard(self)
        if self._watch is not None:
            self._watch.cancel()
        return bool(self.scope.__exit__(*exc_info))

    def body_read(self) -> None:
        """The body is in: no deadline, and the next message may be watched for."""
        self.body_deadline = math.inf

    @property
    def gone(self) -> bool:
        """The caller disconnected: there is nobody to answer."""
        return self.scope.cancelled_caught and not self.body_late

    def look(self, now: float) -> None:
        """The sweep's visit: cut a late body, or start the watch of a long exchange."""
        if now >= self.body_deadline:
            self.body_late = True
            self.scope.cancel()
        elif (
            self._watch is None
            and self.body_deadline == math.inf
            and now - self.started >= WATCH_AFTER
        ):
            self._watch = asyncio.ensure_future(self._watch_disconnect())

    async def _watch_disconnect(self) -> None:
        try:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    self.scope.cancel()
                    return
        except Exception:  # noqa: BLE001 - the server's receive failed: nothing to watch
            return


class Exchanges:
    """The open exchanges of one proxy, and the task that sweeps them while any is open."""

    def __init__(self) -> None:
        self._open: set[Exchange] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def open(self, receive: Receive, body_timeout: float) -> Exchange:
        """A new exchange, to be entered (`with`) before the body is read."""
        return Exchange(self, receive, body_timeout)

    def add(self, exchange: Exchange) -> None:
        self._open.add(exchange)
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())

    def discard(self, exchange: Exchange) -> None:
        self._open.discard(exchange)

    async def _sweep(self) -> None:
        """Look at every open exchange each `SWEEP_EVERY` s; end when none is open
        (the next `add` starts another sweep)."""
        try:
            while self._open:
                await asyncio.sleep(SWEEP_EVERY)
                now = time.monotonic()
                for exchange in list(self._open):
                    exchange.look(now)
        finally:
            self._sweeper = None

    async def aclose(self) -> None:
        """Stop the sweep (the proxy's shutdown)."""
        sweeper = self._sweeper
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
