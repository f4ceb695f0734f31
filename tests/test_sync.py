"""The one sync/async adapter (lmfleet/sync.py), on a bare `FleetRuntime` and over
real simulated nodes: the sync twin gives what its async twin gives, raises what it
raises, is cancelled with its caller (a cancelled task, Ctrl-C), leaves the fleet
usable, and refuses to block the fleet's own loop.

Ctrl-C is a real SIGINT sent to this (the main) thread once the call is waiting, so
the `KeyboardInterrupt` arrives where a notebook's would: in the blocked caller.
"""

from __future__ import annotations

import inspect
import signal
import threading
from collections.abc import Callable, Iterator

import anyio
import pytest
from support import StartSim, sim_stats, wait_until

from lmfleet import (
    ConfigError,
    EventLoopError,
    FleetClosedError,
    FleetRuntime,
    LMFleet,
    NodeStatus,
    WeightUpdate,
)
from lmfleet.sync import blocking, in_fleet_loop

FAST = ("--fast",)


class Boom(Exception):
    pass


class Abort(BaseException):
    """Neither an Exception nor a cancellation: raised in the fleet's loop, asyncio
    would end the loop with it."""


class Service:
    """An object with a runtime, as `LMFleet` and `WeightUpdate` are."""

    def __init__(self, runtime: FleetRuntime) -> None:
        self.runtime = runtime
        self.raised: list[BaseException] = []

    async def acompute(self, x: int, *, error: BaseException | None = None) -> int:
        """Twice `x`, or `error` raised."""
        await anyio.sleep(0)
        if error is not None:
            self.raised.append(error)
            raise error
        return 2 * x

    compute = blocking(acompute)

    @in_fleet_loop
    async def awhere(self) -> str:
        return threading.current_thread().name

    where = blocking(awhere)

    @in_fleet_loop
    async def await_forever(self, started: threading.Event, unwound: list[str]) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):  # unwinding takes a while
                await anyio.sleep(0.2)
            unwound.append(threading.current_thread().name)

    wait_forever = blocking(await_forever)


LOOP = "lmfleet-test-sync"
"""The name of the test runtime's loop thread."""


@pytest.fixture
def service() -> Iterator[Service]:
    runtime = FleetRuntime(name=LOOP)
    yield Service(runtime)
    runtime.close()


def interrupt_main_when(ready: threading.Event) -> threading.Thread:
    """Ctrl-C: SIGINT to the main thread once `ready` is set (the call is waiting)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("a SIGINT reaches only the main thread")
    main = threading.main_thread().ident
    assert main is not None

    def interrupt() -> None:
        if ready.wait(30):
            signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    return thread


# -- results and exceptions ------------------------------------------------------------


def test_sync_and_async_give_the_same_results_and_raise_the_same_errors(
    service: Service,
) -> None:
    assert service.compute(21) == 42
    assert anyio.run(service.acompute, 21) == 42
    assert service.where() == LOOP  # in the fleet's loop
    assert anyio.run(service.awhere) == LOOP

    for error in (Boom("sync"), ConfigError("bad option"), Abort("stop"), SystemExit(3)):
        with pytest.raises(type(error)) as sync_raised:
            service.compute(1, error=error)
        assert sync_raised.value is error  # the very object raised in the loop
    for error in (Boom("async"), ConfigError("bad option"), Abort("stop")):
        with pytest.raises(type(error)) as async_raised:
            anyio.run(lambda e=error: service.acompute(1, error=e))
        assert async_raised.value is error
    # A BaseException that is no cancellation did not end the fleet's loop.
    assert service.compute(5) == 10


def test_the_sync_twins_keep_the_async_signature_and_docstring() -> None:
    pairs = [
        (LMFleet, "chat_many"),
        (LMFleet, "complete_many"),
        (LMFleet, "update_weights"),
        (WeightUpdate, "push"),
        (WeightUpdate, "init_group"),
        (WeightUpdate, "update_from_distributed"),
        (WeightUpdate, "destroy_group"),
    ]
    for owner, name in pairs:
        sync, twin = getattr(owner, name), getattr(owner, "a" + name)
        assert sync.__name__ == name and not inspect.iscoroutinefunction(sync)
        assert inspect.iscoroutinefunction(twin)
        assert inspect.signature(sync) == inspect.signature(twin), name
        assert sync.__doc__ == twin.__doc__ and sync.__doc__, name
    assert inspect.signature(WeightUpdate.__exit__) == inspect.signature(WeightUpdate.__aexit__)


def test_a_closed_runtime_and_one_closed_mid_call_raise_fleet_closed(service: Service) -> None:
    started = threading.Event()
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            service.wait_forever(started, [])
        except FleetClosedError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert started.wait(10)
    service.runtime.close()
    caller.join(10)
    assert not caller.is_alive() and len(outcome) == 1, outcome
    with pytest.raises(FleetClosedError):
        service.compute(1)
    with pytest.raises(FleetClosedError):
        anyio.run(service.awhere)


# -- the fleet's own loop -----------------------------------------------------------------


def test_a_blocking_call_from_inside_the_loop_is_refused(service: Service) -> None:
    async def inside() -> tuple[int, str]:
        with pytest.raises(EventLoopError, match="await it instead"):
            service.compute(1)
        with pytest.raises(EventLoopError, match="await it instead"):
            service.runtime.run(service.acompute, 1)
        # Awaiting the twins there works; an in-loop method runs directly.
        return await service.acompute(4), await service.awhere()

    assert service.runtime.run(inside) == (8, LOOP)


# -- cancellation --------------------------------------------------------------------------


def test_cancelling_an_async_caller_cancels_the_work_in_the_loop(service: Service) -> None:
    started = threading.Event()
    unwound: list[str] = []

    async def caller() -> list[str]:
        with anyio.move_on_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(service.await_forever, started, unwound)
                await anyio.to_thread.run_sync(started.wait, 10)
                tg.cancel_scope.cancel()
        # The cancellation came back once the work had unwound in the fleet's loop.
        return list(unwound)

    assert anyio.run(caller) == [LOOP]
    assert service.compute(3) == 6


def test_ctrl_c_in_a_sync_call_cancels_the_work_and_the_runtime_stays_usable(
    service: Service,
) -> None:
    started = threading.Event()
    unwound: list[str] = []
    interrupter = interrupt_main_when(started)
    with pytest.raises(KeyboardInterrupt):
        service.wait_forever(started, unwound)
    interrupter.join(10)
    # The call waited for the work to unwind before it raised.
    assert unwound == [LOOP]
    assert service.compute(8) == 16
    assert anyio.run(service.acompute, 8) == 16


# -- over real simulated nodes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet() -> Iterator[LMFleet]:
    with LMFleet.simulate(
        nodes=1, weight_updates=True, sim_args=FAST, health_interval=0.2, wait_for_node=5
    ) as fleet:
        fleet.wait_ready(timeout=60)
        yield fleet


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"question {i}"}] for i in range(n)]


def test_chat_many_and_achat_many_agree_over_a_fleet(fleet: LMFleet) -> None:
    sync = fleet.chat_many(prompts(6), max_tokens=5, progress=False)
    async_ = anyio.run(lambda: fleet.achat_many(prompts(6), max_tokens=5, progress=False))
    assert sync.errors == [] and sync.texts == async_.texts and all(sync.texts)
    texts = [p[0]["content"] for p in prompts(3)]
    assert (
        fleet.complete_many(texts, max_tokens=3, progress=False).texts
        == anyio.run(lambda: fleet.acomplete_many(texts, max_tokens=3, progress=False)).texts
    )

    def both(call: Callable[[], object], acall: Callable[[], object]) -> tuple[str, str]:
        with pytest.raises(Exception) as sync_raised:
            call()
        with pytest.raises(Exception) as async_raised:
            anyio.run(acall)
        assert type(sync_raised.value) is type(async_raised.value)
        return str(sync_raised.value), str(async_raised.value)

    one = prompts(1)
    same = both(
        lambda: fleet.chat_many(one, stream=True),
        lambda: fleet.achat_many(one, stream=True),
    )
    assert same[0] == same[1] and "stream=True" in same[0]
    same = both(
        lambda: fleet.update_weights("w", version=1, level=3),
        lambda: fleet.aupdate_weights("w", version=1, level=3),
    )
    assert same[0] == same[1] == "sleep level must be 1 or 2, got 3"


def test_a_sync_twin_from_the_fleets_loop_is_refused_the_async_one_works(fleet: LMFleet) -> None:
    async def inside() -> list[str | None]:
        with pytest.raises(EventLoopError):
            fleet.chat_many(prompts(1), progress=False)
        result = await fleet.achat_many(prompts(2), max_tokens=2, progress=False)
        return result.texts

    texts = fleet.runtime.run(inside)
    assert len(texts) == 2 and all(texts)


def test_ctrl_c_in_chat_many_cancels_the_batch_and_the_fleet_stays_usable(
    start_sim: StartSim,
) -> None:
    node = start_sim("--ttft-ms", "5", "--tpot-ms", "1000")  # 16 tokens: 16 s an answer
    with LMFleet.attach([node.url], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        generating = threading.Event()

        def watch() -> None:
            wait_until(lambda: sim_stats(node.url)["inflight"] >= 4, 20, "the batch in flight")
            generating.set()

        threading.Thread(target=watch, daemon=True).start()
        interrupter = interrupt_main_when(generating)
        with pytest.raises(KeyboardInterrupt):
            fleet.chat_many(prompts(50), concurrency=4, progress=False)
        interrupter.join(10)
        # The batch's requests were cancelled: the node saw each client go away.
        stats = wait_until(lambda: sim_stats(node.url), 10, until=lambda s: s["inflight"] == 0)
        assert stats["aborted"] == 4 and stats["completed"] == 0
        result = fleet.chat_many(prompts(8), max_tokens=1, progress=False)
        assert result.errors == [] and all(result.texts)


def test_the_callers_code_runs_in_the_calling_thread_or_a_worker_thread(fleet: LMFleet) -> None:
    caller = threading.current_thread()
    joined: list[tuple[threading.Thread, bool]] = []

    def join(world_size: int) -> None:
        joined.append((threading.current_thread(), fleet.runtime.in_loop_thread()))

    with fleet.weight_update(version=10) as update:
        update.init_group("127.0.0.1", 29500, join_fn=join)
        update.destroy_group()

    async def from_a_loop() -> None:
        async with fleet.weight_update(version=11) as update:
            await update.ainit_group("127.0.0.1", 29500, join_fn=join)
            await update.adestroy_group()

    anyio.run(from_a_loop)
    assert joined[0] == (caller, False)  # a trainer's CUDA device is set per thread
    assert joined[1][0] is not caller and joined[1][1] is False  # a worker thread
    assert fleet.nodes[0].weight_version == 11


def test_ctrl_c_in_a_weight_update_quarantines_and_the_fleet_stays_usable(
    fleet: LMFleet,
) -> None:
    url = fleet.nodes[0].url
    joining = threading.Event()
    interrupter = interrupt_main_when(joining)

    def join_forever(world_size: int) -> None:
        joining.set()
        threading.Event().wait(30)  # the trainer's side hangs: Ctrl-C

    with pytest.raises(KeyboardInterrupt), fleet.weight_update(version=20) as update:
        update.init_group("127.0.0.1", 29500, join_fn=join_forever)
    interrupter.join(10)
    assert sim_stats(url)["weights"]["groups"] == []  # the group was destroyed
    assert update.result is not None and update.result.updated == ()
    assert "KeyboardInterrupt" in update.failed[url]
    assert fleet.nodes[0].quarantine  # never put back half-updated

    result = fleet.update_weights("recover", version=21)
    assert result.ok and fleet.nodes[0].state is NodeStatus.HEALTHY
    assert fleet.chat_many(prompts(2), max_tokens=2, progress=False).errors == []
