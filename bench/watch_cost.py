"""What watching a proxied exchange for the caller's disconnect costs, per exchange.

The proxy's `forward` once opened an anyio task group with a watching task for
every request; it now arms a timer and a cancel scope, and starts the watching
task only if the exchange lasts (`proxy/forward.py`, `WATCH_AFTER`). This times
each shape 20,000 times in one asyncio loop (uvloop when installed), as CPU per
iteration:

    .venv/bin/python -m bench.watch_cost
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Awaitable, Callable

import anyio

N = 20_000


async def _forever() -> None:
    await anyio.sleep_forever()


async def task_group() -> None:
    """The old shape: a task group with one watching task, cancelled at the end."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_forever)
        await anyio.sleep(0)
        tg.cancel_scope.cancel()


async def timer() -> None:
    """The new shape, for an exchange that ends before the timer fires."""
    handle = asyncio.get_running_loop().call_later(0.5, lambda: None)
    with anyio.CancelScope():
        await anyio.sleep(0)
    handle.cancel()


async def bare() -> None:
    """The exchange itself, stood in for by one trip through the loop."""
    await anyio.sleep(0)


async def main() -> None:
    shapes: list[Callable[[], Awaitable[None]]] = [bare, task_group, timer]
    for shape in shapes * 2:  # twice: the first round warms up
        start = time.process_time()
        for _ in range(N):
            await shape()
        micros = (time.process_time() - start) / N * 1e6
        print(f"{shape.__name__:>10}: {micros:6.1f} us CPU per exchange")


if __name__ == "__main__":
    uvloop = importlib.util.find_spec("uvloop") is not None
    anyio.run(main, backend_options={"use_uvloop": uvloop})
