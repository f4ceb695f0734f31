"""How often each node's `/metrics` is read by `lmfleet serve --workers N`.

Each worker of one proxy routes with every node's own load. Until 2026-12-07 every
worker read every node's `/metrics` each health interval, so a node answered N
reads per interval for one proxy; now the worker whose round comes first reads it
and passes the report on through the hub (lmfleet/proxy/shared.py, `loads`), and
the others skip their read while it is fresh. This starts `--nodes` idle sims
(`--fast`) and `lmfleet serve --workers N --health-interval 1` over them, lets it
settle, and counts the `/metrics` reads the sims saw (their `/sim/stats`) over
`--seconds`: reads per node per second, and the proxy's CPU (all its processes)
per second of wall over the same window. With `--store`, the proxy is one replica
on a real redis-server (its workers then pass the reports through the hub beside
the store, as they do their requests in flight).

    .venv/bin/python -m bench.node_reads --workers 1,2,4 --nodes 16 --seconds 10 [--store]
"""

from __future__ import annotations

import argparse
import os
import time

from bench._common import cpu_seconds, get_json, procs, start_sims, table
from bench.proxy_overhead import start_lmfleet
from bench.routing_live import start_redis

INTERVAL = 1.0
"""The health interval (`--health-interval`, the default): `least_load` reads
`/metrics` every round."""


def _reads(nodes: list[str]) -> int:
    total = 0
    for node in nodes:
        stats = get_json(node + "/sim/stats")
        assert isinstance(stats, dict)
        total += int(stats["by_path"].get("/metrics", 0))
    return total


def measure(workers: int, nodes: int, seconds: float, store: bool) -> tuple[float, float]:
    """(reads per node per second, proxy CPU as a share of one core)."""
    with procs() as group:
        every_core = ",".join(map(str, sorted(os.sched_getaffinity(0))))
        urls = start_sims(group, nodes, every_core, "--fast")
        flags = ("--store", start_redis(group)) if store else ()
        pid, _ = start_lmfleet(group, urls, workers, *flags)
        time.sleep(3 * INTERVAL)  # every worker up and past its first rounds
        reads, cpu, started = _reads(urls), cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        per_node = (_reads(urls) - reads) / nodes / elapsed
        return per_node, (cpu_seconds(pid) - cpu) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4", help="comma list of N")
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--store", action="store_true", help="one replica on a redis-server")
    args = parser.parse_args()
    rows = []
    for workers in [int(n) for n in args.workers.split(",")]:
        per_node, cpu = measure(workers, args.nodes, args.seconds, args.store)
        rows.append([workers, f"{per_node:.2f}", f"{100 * cpu:.1f}"])
    print(table(["workers", "/metrics reads / node / s", "proxy CPU, % of a core"], rows))


if __name__ == "__main__":
    main()
