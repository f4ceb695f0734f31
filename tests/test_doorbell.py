"""The doorbell (lmfleet/doorbell.py): a ring from any thread ends the waits of every
thread and every event loop at once; without one, each wait lasts its timeout. The
long timeouts below make "woken by the ring" observable: had the ring been missed,
the wait would still be on when the test checks."""

from __future__ import annotations

import asyncio
import threading

from lmfleet.doorbell import Doorbell
from lmfleet.transport.plan import MAX_POLL_INTERVAL, POLL_INTERVAL, next_pause

LONG = 60.0


def test_a_ring_wakes_waiting_threads_and_loops() -> None:
    bell = Doorbell()
    seen = bell.rings
    woken: list[str] = []
    waiting = threading.Barrier(4)

    def thread_waits() -> None:
        waiting.wait(10)
        bell.wait(seen, LONG)
        woken.append("thread")

    async def tasks_wait() -> None:
        async def one(name: str) -> None:
            await bell.wait_async(seen, LONG)
            woken.append(name)

        pending = [asyncio.create_task(one(f"task {i}")) for i in range(2)]
        await asyncio.sleep(0)  # both tasks wait on the loop's one future
        waiting.wait(10)
        await asyncio.gather(*pending)

    loops = [threading.Thread(target=asyncio.run, args=(tasks_wait(),)) for _ in range(2)]
    threads = [threading.Thread(target=thread_waits), *loops]
    for thread in threads:
        thread.start()
    waiting.wait(10)
    bell.ring()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(woken) == ["task 0", "task 0", "task 1", "task 1", "thread"]


def test_a_ring_before_the_wait_is_not_missed_and_no_ring_waits_out_the_timeout() -> None:
    bell = Doorbell()
    seen = bell.rings  # read before looking for a node...
    bell.ring()  # ...which came while it looked
    bell.wait(seen, LONG)  # returns at once: the ring came after `seen`
    asyncio.run(bell.wait_async(seen, LONG))
    # No ring after `seen`: the wait lasts its timeout and returns.
    bell.wait(bell.rings, 0.01)
    asyncio.run(bell.wait_async(bell.rings, 0.01))


def test_a_waiting_request_looks_less_often_only_while_no_node_could_take_it() -> None:
    pauses = [POLL_INTERVAL]
    for _ in range(8):
        pauses.append(next_pause(pauses[-1], served=False))
    assert pauses[:4] == [0.05, 0.1, 0.2, 0.4] and pauses[-1] == MAX_POLL_INTERVAL
    # A node serves it (its turn, or room, may come with any answer): back to 50 ms.
    assert next_pause(MAX_POLL_INTERVAL, served=True) == POLL_INTERVAL
