"""`FleetRuntime`: the fleet's event loop thread and the one task group in it.

Public because code beside the fleet (the proxy server, the notebook dashboard and
batch helpers, a user's own background task) must run work in the same loop as
the health monitor: that is what makes a notebook cell return at once while the
proxy keeps serving. Everything it offers is thread-aware, so callers never
touch the portal or the task group themselves.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 - its exit hook goes in before ours (below)
import functools
import importlib.util
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.from_thread import BlockingPortal

from lmfleet import sync
from lmfleet.errors import EventLoopError, FleetClosedError

T = TypeVar("T")

# -- the loop thread ------------------------------------------------------------
# The fleet's own event loop, in a daemon thread, reached through an anyio portal.
#
# Why not `anyio.from_thread.start_blocking_portal()`: its worker thread is not a
# daemon, so an interpreter whose fleet was never closed would hang at exit before
# any `atexit` hook could close it. A daemon thread lets the fleet's `atexit` hook
# run and end the node processes.


def _has_uvloop() -> bool:
    """uvloop (installed with `lmfleet[serve]`) makes the proxy and the monitor cheaper."""
    return importlib.util.find_spec("uvloop") is not None


class BackgroundLoop:
    """One event loop thread; `portal` runs coroutines and callables in it."""

    def __init__(self, name: str = "lmfleet") -> None:
        self._ready = threading.Event()
        self._portal: BlockingPortal | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._portal is None:
            raise EventLoopError(f"the background event loop did not start: {self._error!r}")

    @property
    def portal(self) -> BlockingPortal:
        assert self._portal is not None
        return self._portal

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, func: Callable[..., T], *args: object) -> T:
        """Run a plain function in the loop thread and return its result."""
        if self.in_loop_thread():
            return func(*args)
        return self.portal.call(func, *args)

    def stop(self, timeout: float = 10.0) -> None:
        if self._portal is not None and self._thread.is_alive():
            self._portal.call(self._portal.stop, True)
        self._thread.join(timeout=timeout)

    def _main(self) -> None:
        async def serve() -> None:
            async with BlockingPortal() as portal:
                self._portal = portal
                self._ready.set()
                await portal.sleep_until_stopped()

        try:
            anyio.run(serve, backend_options={"use_uvloop": _has_uvloop()})
        except Exception as exc:  # noqa: BLE001 - handed to the constructor, which raises it
            self._error = exc
        finally:
            self._ready.set()


_OPEN: weakref.WeakSet[FleetRuntime] = weakref.WeakSet()


def _close_open_runtimes() -> None:
    """Interpreter exit (a script that forgot `close()`, a Ctrl-C, a kernel shutdown):
    end every fleet's nodes. The loop threads are daemons, so exit never waits for
    them first."""
    for runtime in list(_OPEN):
        runtime.close()


def _close_at_exit() -> None:
    """Close the fleets left open before the interpreter joins its threads.

    A plain `atexit` hook runs too late: by then Python 3.12 refuses new threads and
    concurrent.futures' pools refuse work (their own exit hook has run), and closing
    a fleet stops its nodes side by side. `threading`'s exit hooks run first, newest
    first, so this one runs before the pools'; `atexit` stays for an interpreter
    without them (then a close falls back to one node at a time)."""
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(_close_open_runtimes)
    atexit.register(_close_open_runtimes)


_close_at_exit()


class FleetRuntime:
    """One daemon event loop thread with one long-lived task group.

    Tasks started with `start` / `start_soon` live until `close()` cancels the
    group; `close` then runs the owner's `on_close` hook (ending node processes)
    before the thread ends, because launched processes are tied to that thread.
    """

    def __init__(
        self, name: str = "lmfleet", *, on_close: Callable[[], None] | None = None
    ) -> None:
        self._on_close = on_close
        self._loop = BackgroundLoop(name)
        self._group: TaskGroup | None = None
        self._stopping: anyio.Event | None = None
        self._closed = False
        self._held, _ = self._loop.portal.start_task(self._hold_group, name=name)
        _OPEN.add(self)

    async def _hold_group(self, *, task_status: TaskStatus[None]) -> None:
        self._stopping = anyio.Event()
        async with anyio.create_task_group() as group:
            self._group = group
            task_status.started()
            await self._stopping.wait()
            group.cancel_scope.cancel()

    # -- state ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        if self._closed:
            raise FleetClosedError("this fleet is closed")

    def in_loop_thread(self) -> bool:
        """True in the loop's own thread, where blocking calls would deadlock."""
        return self._loop.in_loop_thread()

    # -- running work in the loop -----------------------------------------------------------

    def run(self, func: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run `func(*args)` in the loop and wait for it, from any other thread: how
        every sync method reaches the loop (lmfleet/sync.py says what it promises).

        The same result or exception as awaiting it; Ctrl-C (`KeyboardInterrupt`
        here) cancels it in the loop, waits for it to unwind and is raised; refused
        in the loop's own thread (`EventLoopError`), where it would deadlock.
        """
        self._check_callable_here()
        return sync.wait_for(self._loop.portal, functools.partial(func, *args), self._is_closed)

    async def arun(self, func: Callable[..., Awaitable[T]], *args: object) -> T:
        """Await `func(*args)` in the loop from any event loop (in the loop: directly).

        The same result or exception; cancelling the caller cancels it in the loop.
        """
        if self.in_loop_thread():
            return await func(*args)
        self.check_open()
        return await sync.await_in(
            self._loop.portal, functools.partial(func, *args), self._is_closed
        )

    def call(self, func: Callable[..., T], *args: object) -> T:
        """Run a plain function in the loop thread and return its result."""
        return self._loop.call(func, *args)

    def start(
        self, func: Callable[..., Coroutine[Any, Any, Any]], *args: object, name: str = ""
    ) -> Any:
        """Start a long-lived task in the group; return once it calls `task_status.started()`.

        Blocks the caller until then, so it cannot be called from the loop thread.
        """
        self.check_open()
        if self.in_loop_thread():
            raise EventLoopError("FleetRuntime.start() blocks; call it outside the fleet's loop")
        group = self._require_group()
        return self._loop.portal.call(functools.partial(group.start, func, *args, name=name))

    def start_soon(
        self, func: Callable[..., Coroutine[Any, Any, Any]], *args: object, name: str = ""
    ) -> None:
        """Start a task in the group from any thread; it lives until it ends or `close()`."""
        self.check_open()
        group = self._require_group()

        def spawn() -> None:  # returns None: the portal would await what start_soon returns
            group.start_soon(func, *args, name=name)

        self._loop.call(spawn)

    def submit(self, func: Callable[[], Awaitable[T]]) -> Future[T]:
        """Run `func()` in the loop from another thread; cancel the future to cancel it.

        For work the caller waits on (a batch, a button's command): its errors come
        back through the future instead of ending the group.
        """
        self._check_callable_here()
        return self._loop.portal.start_task_soon(func)

    def _check_callable_here(self) -> None:
        """A blocking call: only on an open runtime, and outside its loop."""
        self.check_open()
        if self.in_loop_thread():
            raise EventLoopError(sync.IN_LOOP)

    def _is_closed(self) -> bool:
        return self._closed

    def _require_group(self) -> TaskGroup:
        if self._group is None:  # only between construction and the group's first tick
            raise EventLoopError("the fleet's task group is not running")
        return self._group

    # -- shutdown -------------------------------------------------------------------------

    def close(self, *, timeout: float = 10.0) -> None:
        """Cancel every task, run `on_close()` in the caller's thread, end the loop.

        Idempotent; also run at interpreter exit for a runtime never closed.
        """
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        try:
            if self._stopping is not None:
                self._loop.call(self._stopping.set)
            self._held.result(timeout=timeout)
        finally:
            try:
                if self._on_close is not None:
                    self._on_close()
            finally:
                self._loop.stop(timeout)
