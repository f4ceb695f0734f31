"""How often each node's `/metrics` is read by `lmfleet serve --workers N`.

Each worker of one proxy routes with every node's own load. Until 2026-12-07 every
worker read every node's `/metrics` each health interval, so a node answered N
reads per interval for one proxy; then worker 0 read every node's and passed the
reports on through the hub (lmfleet/proxy/shared.py, `loads`), the others standing
by; now each worker reads its share of the nodes (a hash of the URL) and passes
those on. This starts `--nodes` idle sims (`--fast`) and `lmfleet serve --workers N
--health-interval 1` over them, lets it settle, and counts the `/metrics` reads the
sims saw (their `/sim/stats`) over `--seconds`: reads per node per second, and the
proxy's CPU (all its processes) per second of wall over the same window, and each
worker's. With `--store`, the proxy is one replica on a real redis-server (its
workers then pass the reports through the hub beside the store, as they do their
requests in flight).

    .venv/bin/python -m bench.node_reads --workers 1,2,4 --nodes 16 --seconds 10 [--store]
        [--checkout PATH]   # the proxy of another checkout (a worktree of an older commit)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench._common import children, cpu_seconds, get_json, procs, start_sims, table
from bench.proxy_overhead import ROOT, start_lmfleet
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


def measure(
    workers: int, nodes: int, seconds: float, store: bool, checkout: Path = ROOT
) -> tuple[float, float, list[float]]:
    """(reads per node per second, proxy CPU as a share of one core, each worker's)."""
    with procs() as group:
        every_core = ",".join(map(str, sorted(os.sched_getaffinity(0))))
        urls = start_sims(group, nodes, every_core, "--fast")
        flags = ("--store", start_redis(group)) if store else ()
        pid, _ = start_lmfleet(group, urls, workers, *flags, checkout=checkout)
        time.sleep(3 * INTERVAL)  # every worker up and past its first rounds
        each = children(pid) if workers > 1 else [pid]
        reads, cpu, started = _reads(urls), cpu_seconds(pid), time.monotonic()
        own = [cpu_seconds(p) for p in each]
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        per_node = (_reads(urls) - reads) / nodes / elapsed
        spent = [(cpu_seconds(p) - before) / elapsed for p, before in zip(each, own, strict=True)]
        return per_node, (cpu_seconds(pid) - cpu) / elapsed, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4", help="comma list of N")
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--store", action="store_true", help="one replica on a redis-server")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="whose lmfleet to run")
    args = parser.parse_args()
    rows = []
    for workers in [int(n) for n in args.workers.split(",")]:
        per_node, cpu, spent = measure(workers, args.nodes, args.seconds, args.store, args.checkout)
        each = " / ".join(f"{100 * s:.1f}" for s in spent)
        rows.append([workers, f"{per_node:.2f}", f"{100 * cpu:.1f}", each])
    heads = ["workers", "/metrics reads / node / s", "proxy CPU, % of a core", "each worker's"]
    print(table(heads, rows))


if __name__ == "__main__":
    main()
