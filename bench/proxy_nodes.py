"""What one request costs `lmfleet serve` as the fleet grows: proxy CPU per request at N nodes.

The nodes are `bench.multi_sim` processes (many simulated nodes each, fast cost model)
on core 1 with wrk (`-c32`, chat, 4 tokens); the proxy (default `least_load`) alone
on core 0. Reported per node count: requests/s, p99, the proxy's CPU per request
beyond what it spends idle over the same nodes (its health and `/metrics` rounds),
and that idle share. On 2 cores the nodes and wrk share core 1, so requests/s is
bound by them at small N; CPU per request is the proxy's own cost.

    .venv/bin/python -m bench.proxy_nodes                 # 16 and 512 nodes, ~2 min
    .venv/bin/python -m bench.proxy_nodes --nodes 64,256,512 --seconds 10
    .venv/bin/python -m bench.proxy_nodes --strategy prefix_affinity --sessions 10000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench._common import (
    LOAD_CPU,
    PROXY_CPU,
    PY,
    cpu_seconds,
    free_port,
    machine,
    procs,
    wait_all_healthy,
    wrk,
)

SIM_FLAGS = ["--ttft-ms", "1", "--tpot-ms", "1", "--output-tokens", "4", "--max-batch", "256"]
PER_PROCESS = 128


def _first_line(path: Path, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text()
        if "\n" in text:
            return text.split("\n", 1)[0]
        time.sleep(0.2)
    raise SystemExit(f"{path}: no ports printed in {timeout:g} s")


def run(count: int, seconds: float, strategy: str = "least_load", sessions: int = 0) -> str:
    with procs() as group:
        sizes = [PER_PROCESS] * (count // PER_PROCESS)
        sizes += [count % PER_PROCESS] if count % PER_PROCESS else []
        urls: list[str] = []
        with tempfile.TemporaryDirectory() as logs:
            names = [f"{logs}/sims{i}.txt" for i in range(len(sizes))]
            for name, size in zip(names, sizes, strict=True):  # each prints its ports
                argv = [PY, "-m", "bench.multi_sim", "--nodes", str(size), *SIM_FLAGS]
                group.start(argv, LOAD_CPU, log=name)
            for name in names:
                urls += [f"http://127.0.0.1:{port}" for port in _first_line(Path(name)).split()]
        port = free_port()
        argv = [PY, "-m", "lmfleet", "serve", "--server-port", str(port)]
        argv += ["--disable-cache-status", "--log-level", "WARNING", "--strategy", strategy]
        for url in urls:
            argv += ["--node", url]
        proxy = group.start(argv, PROXY_CPU)
        base = f"http://127.0.0.1:{port}"
        wait_all_healthy(base, urls, timeout=120.0)
        before, started = cpu_seconds(proxy.pid), time.monotonic()
        time.sleep(seconds)
        idle = (cpu_seconds(proxy.pid) - before) / (time.monotonic() - started)
        rows = []
        for _ in range(2):
            before, started = cpu_seconds(proxy.pid), time.monotonic()
            result = wrk(base, 32, seconds, stream=False, max_tokens=4, sessions=sessions)
            used, wall = cpu_seconds(proxy.pid) - before, time.monotonic() - started
            per_request = (used - idle * wall) / max(1, result.requests) * 1000
            rows.append(
                f"| {count} | {result.rps:,.0f} | {result.p99_ms:.0f} | {per_request:.3f} | "
                f"{idle:.1%} | {result.errors + result.non2xx} |"
            )
        return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", default="16,512", help="node counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--strategy", default="least_load", help="the proxy's --strategy")
    parser.add_argument(
        "--sessions", type=int, default=0, help="x-session-ids drawn per request (affinity keys)"
    )
    args = parser.parse_args()
    print(machine())
    print("| nodes | requests/s | p99 ms | proxy CPU ms/request | proxy idle | errors |")
    print("|---|---|---|---|---|---|")
    for count in (int(x) for x in args.nodes.split(",")):
        print(run(count, args.seconds, args.strategy, args.sessions), flush=True)


if __name__ == "__main__":
    main()
