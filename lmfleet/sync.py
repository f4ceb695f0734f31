"""The one sync/async adapter: every capability is written once, as a coroutine.

    blocking(amethod)      the sync twin of an async method: `push = blocking(apush)`.
                           It has the twin's signature (typed: mypy and IDEs check
                           calls to it; at run time: `help()`, `inspect.signature`)
                           and runs the twin in the fleet's loop through
                           `FleetRuntime.run`, from a script, a thread or a Jupyter
                           cell whose own loop is running.
    in_fleet_loop(amethod) an async method whose body runs in the fleet's loop,
                           whichever loop awaits it (`FleetRuntime.arun`).
    run_beside(func)       the caller's own blocking code (a trainer's `join_fn`,
                           `broadcast_fn`), run beside the fleet's calls.

What a call through the adapter promises, sync or async:

- the same result, and the same exception object, as the coroutine gave in the loop
  (a `KeyboardInterrupt` or `SystemExit` it raises is carried out too: raised out of
  a task, asyncio would end the loop with it); a call whose work the fleet's closing
  cancelled raises `FleetClosedError`;
- cancelling the caller cancels the work in the fleet's loop: a cancelled task (an
  async caller), or Ctrl-C in a sync call (`KeyboardInterrupt` in the waiting
  thread). The caller then waits for the work to unwind, up to `CANCEL_WAIT` (a
  second Ctrl-C stops waiting), and gets its cancellation or `KeyboardInterrupt`;
  the fleet stays usable;
- a blocking call from the fleet's own loop is refused (`EventLoopError`): it would
  deadlock the loop; code there awaits the async twin.

The caller's own code (`run_beside`) runs where its call came from: in a sync call,
the thread waiting for the call runs it (a trainer's current CUDA device is set per
thread); in an async call, a worker thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import queue
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import CancelledError, Future
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from lmfleet.errors import FleetClosedError

T = TypeVar("T")
P = ParamSpec("P")

CANCEL_WAIT = 10.0
"""Seconds a call its caller cancelled waits for the work to unwind in the fleet's
loop (a weight update quarantines its nodes, a batch closes its requests) before it
raises anyway; the rest of the unwinding then goes on in the loop."""

IN_LOOP = "a blocking call from the fleet's own event loop; await it instead"
"""`EventLoopError`'s message for a blocking call made in the fleet's loop."""


class Runner(Protocol):
    """What the adapter needs of a `FleetRuntime`."""

    def run(self, func: Callable[[], Awaitable[T]]) -> T: ...

    async def arun(self, func: Callable[[], Awaitable[T]]) -> T: ...


class HasRuntime(Protocol):
    """An object whose methods run in a fleet's loop (`LMFleet`, `WeightUpdate`)."""

    @property
    def runtime(self) -> Runner: ...


S = TypeVar("S", bound=HasRuntime)


# -- declaring twins ------------------------------------------------------------------------


def blocking(twin: Callable[Concatenate[S, P], Awaitable[T]]) -> Callable[Concatenate[S, P], T]:
    """The sync twin of the async method `twin` (named without its `a`): the same
    parameters and docstring; it runs `twin` in the fleet's loop and waits."""
    name = _sync_name(twin.__name__)

    @functools.wraps(twin)
    def wait(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.runtime.run(functools.partial(twin, self, *args, **kwargs))

    wait.__name__ = name
    wait.__qualname__ = f"{twin.__qualname__.rpartition('.')[0]}.{name}".lstrip(".")
    return wait


def in_fleet_loop(
    method: Callable[Concatenate[S, P], Awaitable[T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """`method`'s body runs in the fleet's loop, awaited from any loop (the fleet's
    own: directly); its state (a weight update's session) lives there."""

    @functools.wraps(method)
    async def hop(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.runtime.arun(functools.partial(method, self, *args, **kwargs))

    return hop


def _sync_name(name: str) -> str:
    """`achat_many` -> `chat_many`, `__aenter__` -> `__enter__`."""
    if name.startswith("__a") and name.endswith("__"):
        return "__" + name[3:]
    if not name.startswith("a"):
        raise TypeError(f"{name}: an async twin's name starts with 'a'")
    return name[1:]


# -- the caller's own code ---------------------------------------------------------------------


async def run_beside(func: Callable[..., T], *args: Any) -> T:
    """Run the caller's blocking `func(*args)` while the fleet's calls go on: in the
    thread of the sync call that is waiting (see the module docstring), else in a
    worker thread. Its exception is raised here."""
    caller = _CALLER.get()
    if caller is not None:
        return await caller.run(func, *args)
    return await anyio.to_thread.run_sync(func, *args)


class _Job:
    """One piece of the caller's code, handed to the waiting thread."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func = func
        self.args = args
        self.done = anyio.Event()  # made and awaited in the fleet's loop
        self.result: Any = None
        self.error: Exception | None = None


class _Caller:
    """The thread waiting in a sync call, which runs the jobs its work sends it."""

    def __init__(self, portal: BlockingPortal) -> None:
        self._portal = portal
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._left = False

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        job = _Job(func, args)
        with self._lock:
            left = self._left
            if not left:
                self._jobs.put(job)
        if left:  # a task the call started outlived it: nobody waits there any more
            result: T = await anyio.to_thread.run_sync(func, *args)
            return result
        await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[no-any-return]

    def serve(self) -> None:
        """Run jobs in this thread until the work ends (`ended`)."""
        while (job := self._jobs.get()) is not None:
            try:
                job.result = job.func(*job.args)
            except Exception as exc:  # noqa: BLE001 - raised in the loop, where it is awaited
                job.error = exc
            # A KeyboardInterrupt (Ctrl-C) leaves this thread instead: the call is cancelled.
            with contextlib.suppress(RuntimeError):  # the loop has stopped: nobody waits
                self._portal.call(job.done.set)

    def ended(self) -> None:
        self._jobs.put(None)

    def leave(self) -> None:
        with self._lock:
            self._left = True


_CALLER: contextvars.ContextVar[_Caller | None] = contextvars.ContextVar(
    "lmfleet_caller", default=None
)


# -- calls into the loop ------------------------------------------------------------------------


class _Escaped(Exception):
    """A `BaseException` (KeyboardInterrupt, SystemExit) the work raised, carried to
    the caller: raised out of a task, asyncio would end the fleet's loop with it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


class _Call(Generic[T]):
    """`func()` running in the fleet's loop for a caller in another thread or loop.

    It is cancelled through its own cancel scope rather than its future, so that a
    Ctrl-C that arrives while it is being started still reaches it."""

    def __init__(
        self,
        portal: BlockingPortal,
        func: Callable[[], Awaitable[T]],
        closed: Callable[[], bool],
        caller: _Caller | None = None,
    ) -> None:
        self._portal = portal
        self._func = func
        self._closed = closed
        self._caller = caller
        self._scope: anyio.CancelScope | None = None
        self._cancelled = False
        self.unwound = threading.Event()
        self.future: Future[T] | None = None

    def start(self) -> Future[T]:
        self.future = self._portal.start_task_soon(self._guarded)
        return self.future

    async def _guarded(self) -> T:
        _CALLER.set(self._caller)  # this task's context, and its children's
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self._cancelled:
                    scope.cancel()
                return await self._func()
            raise CancelledError("cancelled by its caller")
        except (anyio.get_cancelled_exc_class(), Exception):
            raise
        except BaseException as exc:  # noqa: BLE001 - carried out, raised in the caller
            raise _Escaped(exc) from None
        finally:
            self.unwound.set()

    def cancel(self) -> bool:
        """Cancel the work, begun or not; False if it had ended (else see `unwound`)."""
        if self.unwound.is_set():
            return False
        self._cancelled = True  # seen by the task if it has not begun yet

        def cancel_scope() -> None:
            if self._scope is not None:
                self._scope.cancel()

        with contextlib.suppress(RuntimeError):  # the loop has stopped, and the work with it
            self._portal.start_task_soon(cancel_scope)
        return True

    def outcome(self) -> T:
        """The work's result, or its exception raised (once the future is done)."""
        assert self.future is not None
        try:
            return self.future.result()
        except CancelledError:
            if self._closed():
                raise FleetClosedError("the fleet was closed while this call ran") from None
            raise
        except _Escaped as carrier:
            error = carrier.error
        raise error


def wait_for(
    portal: BlockingPortal, func: Callable[[], Awaitable[T]], closed: Callable[[], bool]
) -> T:
    """Run `func()` in the portal's loop and wait here (not from that loop)."""
    caller = _Caller(portal)
    call = _Call(portal, func, closed, caller)
    try:
        call.start().add_done_callback(lambda _: caller.ended())
        caller.serve()
    except BaseException:  # Ctrl-C while starting, waiting, or in the caller's own code
        caller.leave()
        if call.cancel():
            call.unwound.wait(CANCEL_WAIT)  # a second Ctrl-C ends this wait
        raise
    caller.leave()
    return call.outcome()


async def await_in(
    portal: BlockingPortal, func: Callable[[], Awaitable[T]], closed: Callable[[], bool]
) -> T:
    """Await `func()` in the portal's loop from another loop."""
    call = _Call(portal, func, closed)
    future = call.start()
    try:
        await anyio.to_thread.run_sync(concurrent.futures.wait, [future], abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        if call.cancel():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(call.unwound.wait, CANCEL_WAIT)
        raise
    return call.outcome()
