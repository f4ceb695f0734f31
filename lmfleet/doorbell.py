"""`Doorbell`: wakes the requests that wait for a node when one may have come.

Requests that find no node they could use wait in the admission queue
(transport/plan.py), in any thread and any event loop: the sync clients' callers,
each async client's loop, the proxy's. While nothing could take them they look
again less and less often (each look wakes its loop: a thousand requests waiting
through a weight update, each looking every 50 ms, cost half a core), and the
registry rings this bell when a node becomes able to take requests, so that they
look at once rather than at the end of their pause.

A ring wakes every waiter, in every thread and loop: rings are rare (a node woken,
back from an ejection, updated), and each waiter then takes its turn in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref

import anyio


class Doorbell:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rang = threading.Condition(self._lock)
        self._rings = 0
        self._futures: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[None]]
        self._futures = weakref.WeakKeyDictionary()

    @property
    def rings(self) -> int:
        """How many times it has rung: read before looking, handed to `wait`, so that a
        ring in between is not missed."""
        return self._rings

    def ring(self) -> None:
        """Wake every waiter (from any thread)."""
        with self._lock:
            self._rings += 1
            self._rang.notify_all()
            futures, self._futures = self._futures, weakref.WeakKeyDictionary()
        for loop, future in futures.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                loop.call_soon_threadsafe(_resolve, future)

    def wait(self, seen: int, timeout: float) -> None:
        """Block this thread up to `timeout` seconds, or until a ring after `seen`."""
        with self._lock:
            self._rang.wait_for(lambda: self._rings != seen, timeout)

    async def wait_async(self, seen: int, timeout: float) -> None:
        """`wait` in the running event loop: its waiters share one future per loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): the pause alone
            await anyio.sleep(timeout)
            return
        with self._lock:
            if self._rings != seen:
                return
            future = self._futures.get(loop)
            if future is None:
                future = self._futures[loop] = loop.create_future()
        await asyncio.wait((future,), timeout=timeout)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
