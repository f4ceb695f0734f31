"""What requests that wait for a node cost the process they wait in, and how soon they
are served once one comes.

N async requests through one `fleet.async_client()` find every node asleep (no wake on
demand: the wait of a weight update, or of an operator's wakeup) and wait in the
admission queue. The figure is the CPU of the process (`process_time()` over a
window: the waiting requests' polls, in the caller's loop, and the fleet's own
thread) as % of one core; then `fleet.wakeup()`, and the time from the first node
back to healthy until the first request leaves the queue with it, and until the
last has.

    .venv/bin/python bench/waiting_cost.py --waiting 1000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

from lmfleet import LMFleet, NodeStatus

MESSAGES = [{"role": "user", "content": "x"}]


async def _one_run(fleet: LMFleet, waiting: int, window: float) -> tuple[float, float, float]:
    client = fleet.async_client(max_retries=0)
    registry = fleet.registry

    async def ask() -> None:
        await client.chat.completions.create(model=fleet.model, messages=MESSAGES, max_tokens=1)

    fleet.sleep()
    tasks = [asyncio.create_task(ask()) for _ in range(waiting)]
    while registry.waiting < waiting:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # past the first, faster polls
    cpu, start = time.process_time(), time.monotonic()
    await asyncio.sleep(window)
    share = (time.process_time() - cpu) / (time.monotonic() - start)
    left: list[float] = []

    def watch() -> None:  # in a thread: the loop is busy with the herd
        while not any(n.status is NodeStatus.HEALTHY for n in registry.snapshot()):
            time.sleep(0.0005)
        healthy = time.monotonic()  # from here on a node can take them
        while registry.waiting == waiting:
            time.sleep(0.0005)
        left.append(time.monotonic() - healthy)
        while registry.waiting:
            time.sleep(0.0005)
        left.append(time.monotonic() - healthy)

    watcher = threading.Thread(target=watch)
    watcher.start()
    await asyncio.to_thread(fleet.wakeup)
    await asyncio.gather(*tasks)
    watcher.join()
    return 100 * share, left[0], left[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiting", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window", type=float, default=3.0, help="seconds CPU is read over")
    args = parser.parse_args()
    sims = ("--fast", "--max-batch", "1024")
    with LMFleet.simulate(
        nodes=2, sim_args=sims, wait_for_node=60, admission_queue=100_000
    ) as fleet:
        fleet.wait_ready(timeout=60)
        rows = [asyncio.run(_one_run(fleet, args.waiting, args.window)) for _ in range(args.runs)]
    names = ("CPU % of a core", "first leased s", "last leased s")
    for name, values in zip(names, zip(*rows, strict=True), strict=True):
        shown = ", ".join(f"{v:.3f}" for v in values)
        print(f"{args.waiting} waiting: {name}: median {statistics.median(values):.3f} ({shown})")


if __name__ == "__main__":
    main()
