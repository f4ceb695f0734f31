"""The fleet's own event loop, in a daemon thread, reached through an anyio portal.

Why not `anyio.from_thread.start_blocking_portal()`: its worker thread is not a
daemon, so an interpreter whose fleet was never closed would hang at exit before
any `atexit` hook could close it. A daemon thread lets the fleet's `atexit` hook
run and end the node processes.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from typing import TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from lmfleet.errors import EventLoopError

T = TypeVar("T")


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
