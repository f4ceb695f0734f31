"""What sharing requests in flight costs through the `--workers` hub, by worker count.

Each worker of `lmfleet serve --workers N` tells the others its requests in flight
per node (lmfleet/proxy/shared.py, `held`) through the supervisor's hub
(lmfleet/proxy/hub.py). This runs the real `Hub` on a Unix socket with N simulated
workers in one process: each sends a `held` message every `SYNC_EVERY` (20 ms)
with `--changed` of `--nodes` counts changed, as a busy worker does, and reads
every message the hub sends it (parsed, as a worker's link parses it). Printed per
N: the messages each worker receives per second and the CPU this process used per
second of wall (the hub's relaying plus the workers' reading; a real worker also
applies each message to its registry, ~27 µs, docs/benchmarks.md).

    .venv/bin/python -m bench.hub_counts --workers 2,4,8,16 --seconds 5
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import anyio

from lmfleet.proxy.hub import Hub
from lmfleet.proxy.shared import SYNC_EVERY, Line


async def _worker(
    path: Path, index: int, nodes: list[str], changed: int, received: list[int]
) -> None:
    stream = await anyio.connect_unix(path)
    line = Line(stream)
    await line.send({"worker": index})
    await line.receive()  # the snapshot
    rng = random.Random(index)
    counts = dict.fromkeys(nodes, 0)

    async def read() -> None:
        while True:
            await line.receive()
            received[index] += 1

    async with stream, anyio.create_task_group() as tg:
        tg.start_soon(read)
        told = 0.0
        while True:
            await anyio.sleep(SYNC_EVERY)
            picked = rng.sample(nodes, changed)
            for url in picked:
                counts[url] = rng.randrange(0, 8)
            whole = time.monotonic() - told >= 1.0
            sent = counts if whole else {u: counts[u] for u in picked}
            told = time.monotonic() if whole else told
            await line.send({"op": "held", "by": f"w{index}", "counts": sent, "whole": whole})


async def run(workers: int, nodes: int, changed: int, seconds: float) -> tuple[float, float]:
    """(messages received per worker per second, CPU seconds per wall second)."""
    urls = [f"http://10.0.0.{i}:23333" for i in range(nodes)]
    received = [0] * workers
    with tempfile.TemporaryDirectory() as tmp:
        hub = Hub(Path(tmp) / "hub.sock")
        async with anyio.create_task_group() as tg:
            await tg.start(hub.serve)
            for i in range(workers):
                tg.start_soon(_worker, hub.path, i, urls, changed, received)
            await anyio.sleep(1.0)  # settle: every worker connected
            start_msgs, cpu, wall = sum(received), time.process_time(), time.monotonic()
            await anyio.sleep(seconds)
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            msgs = sum(received) - start_msgs
            tg.cancel_scope.cancel()
    return msgs / workers / wall, cpu / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default="2,4,8,16")
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--changed", type=int, default=4, help="counts changed per message")
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    print("| workers | messages / worker / s | CPU (hub + workers' reads), % of a core |")
    print("|---|---|---|")
    for n in (int(w) for w in args.workers.split(",")):
        per_worker, cpu = anyio.run(
            run, n, args.nodes, args.changed, args.seconds, backend_options={"use_uvloop": True}
        )
        print(f"| {n} | {per_worker:,.0f} | {cpu * 100:.1f} |", flush=True)


if __name__ == "__main__":
    main()
