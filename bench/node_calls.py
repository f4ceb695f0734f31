"""Node calls: the hand-written codec (`Prober`) or httpx2, CPU and wall time per call.

`lmfleet/node/client.py` sends the per-round GETs (`/health`, `/metrics`) over the
lean HTTP/1.1 prober and the rare commands (`/is_sleeping`, `/v1/models`, sleep,
wakeup, weights) over httpx2. This measures what each costs, per call, in the
caller's process: one `lmfleet sim --fast` node (its own process, core 1) and, in
this process (core 0, one event loop: uvloop where installed, as the fleet's), one
call at a time on a kept-alive connection:

- `prober /health`: `Prober.get(url, "/health", timeout)`;
- `httpx2 /health`: `httpx2.AsyncClient.get(url + "/health")`;
- `NodeClient.is_sleeping`: the whole command path over httpx2 (build the request
  with the node's key and timeout, send, map errors, decode the JSON);
- `prober /is_sleeping`: the same document over the codec, decoded the same way.

Each variant makes `--calls` calls after a warm-up, in `--rounds` rounds of
calls/rounds each, the variants in rotating order, so that drift on a shared machine
touches all alike. CPU: `time.process_time()` of this process over a round / calls
(the node's CPU is not counted); wall: each call's `perf_counter()` time (the node's
answer included). Reported: the median over rounds of CPU per call (min-max), the
median wall per call, and both as a ratio to `prober /health`.

    .venv/bin/python -m bench.node_calls [--calls 2000] [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2

from bench._common import (
    LOAD_CPU,
    PROXY_CPU,
    load_average,
    machine,
    pin_self,
    procs,
    save_json,
    start_sims,
    table,
)
from lmfleet.node.client import NodeAddress, NodeClient
from lmfleet.wire.prober import Prober

TIMEOUT = 5.0
Call = Callable[[], Awaitable[object]]


def _variants(url: str, prober: Prober, http: httpx2.AsyncClient) -> dict[str, Call]:
    nodes = NodeClient(http)
    node = NodeAddress(url)
    health = url + "/health"

    async def prober_health() -> object:
        status, _ = await prober.get(url, "/health", TIMEOUT)
        assert status == 200, status
        return status

    async def httpx2_health() -> object:
        response = await http.get(health)
        assert response.status_code == 200, response.status_code
        return response

    async def node_client_is_sleeping() -> object:
        value = await nodes.is_sleeping(node, TIMEOUT)
        assert value is False, value
        return value

    async def prober_is_sleeping() -> object:
        status, body = await prober.get(url, "/is_sleeping", TIMEOUT)
        assert status == 200, status
        document = json.loads(body)
        value = document.get("is_sleeping") if isinstance(document, dict) else None
        assert value is False, value
        return value

    return {
        "(a) `Prober.get` /health": prober_health,
        "(b) `httpx2.AsyncClient.get` /health": httpx2_health,
        "(c) `NodeClient.is_sleeping` (httpx2)": node_client_is_sleeping,
        "(d) `Prober.get` /is_sleeping + JSON": prober_is_sleeping,
    }


async def _batch(call: Call, count: int) -> tuple[float, list[float]]:
    """`count` calls one after another: (process CPU seconds, each call's wall seconds)."""
    walls = []
    clock = time.perf_counter
    cpu0 = time.process_time()
    for _ in range(count):
        t0 = clock()
        await call()
        walls.append(clock() - t0)
    return time.process_time() - cpu0, walls


async def _measure(url: str, calls: int, rounds: int, warmup: int) -> dict[str, dict[str, Any]]:
    prober = Prober()
    limits = httpx2.Limits(max_connections=256, max_keepalive_connections=64)  # the fleet's
    async with httpx2.AsyncClient(timeout=TIMEOUT, limits=limits) as http:
        variants = _variants(url, prober, http)
        names = list(variants)
        for call in variants.values():
            await _batch(call, warmup)
        per_round = max(1, calls // rounds)
        cpu: dict[str, list[float]] = {name: [] for name in names}
        walls: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                gc.collect()
                spent, took = await _batch(variants[name], per_round)
                cpu[name].append(spent / per_round)
                walls[name] += took
        await prober.aclose()
    return {
        name: {
            "calls": per_round * rounds,
            "cpu_us_rounds": [1e6 * c for c in cpu[name]],
            "cpu_us": 1e6 * statistics.median(cpu[name]),
            "wall_us": 1e6 * statistics.median(walls[name]),
            "wall_us_p90": 1e6 * statistics.quantiles(walls[name], n=10)[-1],
        }
        for name in names
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="per variant (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=200, help="calls per variant first")
    parser.add_argument("--out", type=Path, help="also save the results as JSON here")
    args = parser.parse_args()
    pin_self(PROXY_CPU)
    uvloop = importlib.util.find_spec("uvloop") is not None
    started = time.monotonic()
    print(f"{machine()}; load average {load_average():.2f}", flush=True)
    with procs() as group:
        (url,) = start_sims(group, 1, LOAD_CPU, "--fast")
        results = anyio.run(
            _measure,
            url,
            args.calls,
            args.rounds,
            args.warmup,
            backend_options={"use_uvloop": uvloop},
        )
    base = results["(a) `Prober.get` /health"]
    rows = []
    for name, r in results.items():
        low, high = min(r["cpu_us_rounds"]), max(r["cpu_us_rounds"])
        rows.append(
            [
                name,
                f"{r['cpu_us']:.0f} ({low:.0f}-{high:.0f})",
                f"{r['cpu_us'] / base['cpu_us']:.1f}x",
                f"{r['wall_us']:.0f}",
                f"{r['wall_us_p90']:.0f}",
                f"{r['wall_us'] / base['wall_us']:.1f}x",
            ]
        )
    heads = ["call", "CPU µs/call", "CPU vs (a)", "wall µs p50", "wall µs p90", "wall vs (a)"]
    print()
    print(table(heads, rows))
    calls = args.calls // args.rounds * args.rounds
    loop = "uvloop" if uvloop else "asyncio"
    print(f"\n{calls} calls each in {args.rounds} rounds, {loop}", end="")
    print(f", load average {load_average():.2f}")
    seconds = time.monotonic() - started
    print(f"total {seconds:.0f} s", flush=True)
    if args.out:
        data = {"machine": machine(), "loop": loop, "seconds": seconds, "results": results}
        save_json(args.out, data)


if __name__ == "__main__":
    main()
