"""FleetRuntime: the fleet's loop thread and task group, as the proxy and notebook use it."""

from __future__ import annotations

import subprocess
import sys
import threading

import anyio
import httpx2
import pytest
from anyio.abc import TaskStatus
from support import wait_until

from lmfleet import EventLoopError, FleetClosedError, FleetRuntime


def test_tasks_run_in_the_loop_thread_and_end_with_the_runtime() -> None:
    closed: list[str] = []
    runtime = FleetRuntime(on_close=lambda: closed.append(threading.current_thread().name))
    started = threading.Event()
    cancelled = threading.Event()
    seen: list[bool] = []

    async def forever() -> None:
        seen.append(runtime.in_loop_thread())
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    runtime.start_soon(forever, name="forever")
    assert started.wait(10) and seen == [True]
    assert not runtime.in_loop_thread()
    runtime.close()
    runtime.close()  # idempotent
    assert cancelled.is_set()
    assert closed == [threading.current_thread().name]  # once, in the closing thread
    assert runtime.closed
    with pytest.raises(FleetClosedError):
        runtime.start_soon(forever)


def test_start_waits_for_started_and_returns_its_value() -> None:
    runtime = FleetRuntime()
    try:

        async def service(*, task_status: TaskStatus[str]) -> None:
            task_status.started("ready")
            await anyio.sleep_forever()

        assert runtime.start(service) == "ready"
    finally:
        runtime.close()


def test_submit_gives_a_future_and_blocking_calls_refuse_the_loop_thread() -> None:
    runtime = FleetRuntime()
    try:

        async def answer() -> int:
            return 42

        assert runtime.submit(answer).result(timeout=10) == 42
        assert runtime.run(answer) == 42

        async def block_from_inside() -> None:
            runtime.run(answer)

        with pytest.raises(EventLoopError, match="await it instead"):
            runtime.run(block_from_inside)
        with pytest.raises(EventLoopError):
            runtime.call(lambda: runtime.submit(answer))
    finally:
        runtime.close()


def test_start_soon_from_inside_the_loop() -> None:
    runtime = FleetRuntime()
    try:
        done = threading.Event()

        async def child() -> None:
            done.set()

        runtime.call(lambda: runtime.start_soon(child))
        assert done.wait(10)
    finally:
        runtime.close()


# A script that never closes its fleet (or is stopped by Ctrl-C): its nodes end at
# exit, and the exit says nothing more than the script did.
NEVER_CLOSED = """
from lmfleet import LMFleet
fleet = LMFleet.simulate(nodes=2)
fleet.wait_ready(timeout=60)
print(" ".join(node.url for node in fleet.nodes), flush=True)
fleet.client(max_retries=0).chat.completions.create(
    model=fleet.model, messages=[{"role": "user", "content": "x"}], max_tokens=2)
"""


def _refused(url: str) -> bool:
    try:
        httpx2.get(url + "/health", timeout=5)
    except httpx2.ConnectError:
        return True
    return False


def test_a_fleet_never_closed_ends_its_nodes_quietly_at_exit() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NEVER_CLOSED], capture_output=True, text=True, timeout=120
    )
    # Closing at exit stops the nodes side by side: it must run while threads start.
    assert done.returncode == 0 and done.stderr == "", done.stderr
    urls = done.stdout.split()
    assert len(urls) == 2
    for url in urls:
        wait_until(lambda url=url: _refused(url), what=f"{url} ended with the script")
