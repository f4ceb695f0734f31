"""`PerLoopTransport`: one connection pool per event loop, so that one async client
works in any loop.

An asyncio connection belongs to the loop that opened it. A script that calls
`asyncio.run` twice with the same `fleet.async_client()`, or two threads that run a
loop each, would otherwise reuse a connection of a loop that is closed or not
theirs ("Event loop is closed", or a hang). Each loop gets its own inner transport,
made on its first request, and forgotten with the loop (a weak key): a closed loop's
connections cannot be closed from another loop, and are dead already. Outside
asyncio (trio) there is one pool.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

import httpx2


class PerLoopTransport(httpx2.AsyncBaseTransport):
    def __init__(self, make: Callable[[], httpx2.AsyncBaseTransport]) -> None:
        self._make = make
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx2.AsyncBaseTransport]
        self._pools = weakref.WeakKeyDictionary()
        self._other: httpx2.AsyncBaseTransport | None = None  # outside asyncio

    def _pool(self) -> httpx2.AsyncBaseTransport:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if self._other is None:
                self._other = self._make()
            return self._other
        pool = self._pools.get(loop)
        if pool is None:
            pool = self._pools[loop] = self._make()
        return pool

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        return await self._pool().handle_async_request(request)

    async def aclose(self) -> None:
        """Close this loop's pool; another live loop's is left to that loop's own
        requests (it cannot be closed from here) and ends with it."""
        try:
            pool = self._pools.pop(asyncio.get_running_loop(), None)
        except RuntimeError:
            pool, self._other = self._other, None
        if pool is not None:
            await pool.aclose()
