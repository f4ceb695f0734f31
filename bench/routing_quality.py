"""Routing quality: open-loop Poisson load on 4 realistic simulator nodes, one 3x slower.

Nodes: `lmfleet sim` with the cost model (ttft 40 ms + 0.1 ms/prompt token, 20 ms per
output token growing 2 % per extra running sequence, max batch 16, prefix cache),
`--enable-metrics`; node 4 has `--speed 0.333`. Nodes run on core 0, this script
(the clients) and LMDeploy's proxy on core 1.

Workload: one fixed, seeded schedule per load level; prompts of 20-1500 words
(log-normal, median 150), max_tokens from a mix (70 % 8-64, 25 % 64-192, 5 % 192-384),
all streamed (TTFT = first chunk). Capacity is measured first: closed loop at
1.5x the fleet's batch slots through the ideal router; loads are 50/80/95 % of it.

Routers: our strategies through the client transport (`AsyncFleetTransport`, raw
httpx2 on top so the client's own parsing does not cost CPU), LMDeploy 0.18.0's proxy
with each of its strategies, and `ideal`: join-shortest-queue with perfect
knowledge, i.e. the node with the least (exact in-flight + 1) / (true speed) —
exact because this process sends all traffic, true speed from the node flags.

    .venv/bin/python -m bench.routing_quality [--seconds 20] [--parts single,multi,prefix]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2

from bench._common import (
    LOAD_CPU,
    MODEL,
    PROXY_CPU,
    PY,
    ROOT,
    load_average,
    machine,
    pin_self,
    procs,
    save_json,
    start_sims,
    table,
)
from bench.proxy_overhead import LMDEPLOY_PY, start_lmdeploy
from lmfleet import LMFleet
from lmfleet.launch.process import die_with_parent
from lmfleet.routing import LeastLoad, NodeLoads, parse_queue
from lmfleet.transport import AsyncFleetTransport

SPEEDS = (1.0, 1.0, 1.0, 0.333)
NODE_FLAGS = ("--max-batch", "16", "--output-tokens", "4096", "--enable-metrics")
OURS = ("least_connections", "power_of_two", "min_expected_latency", "least_load")
LMDEPLOY = ("random", "min_expected_latency", "min_observed_latency")
LOADS = (0.5, 0.8, 0.95)
PLACEHOLDER = "http://lmfleet.invalid"
Item = tuple[float, str, int, dict[str, str]]  # start offset, prompt, max_tokens, headers


def schedule(rate: float, seconds: float, seed: int) -> list[Item]:
    rng = random.Random(seed)
    items, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return items
        words = min(1500, max(20, int(rng.lognormvariate(5.0, 0.8))))
        kind = rng.random()
        if kind < 0.7:
            out = rng.randint(8, 64)
        elif kind < 0.95:
            out = rng.randint(64, 192)
        else:
            out = rng.randint(192, 384)
        prompt = f"request {seed}-{len(items)}: " + "lorem ipsum " * (words // 2)
        items.append((t, prompt, out, {}))


Send = Callable[[dict[str, Any], dict[str, str]], Any]


class Router:
    """How one run sends a request: a client, a URL, and optional pick/release hooks."""

    def __init__(self, client: httpx2.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url

    @asynccontextmanager
    async def stream(self, body: dict[str, Any], headers: dict[str, str]) -> AsyncIterator[Any]:
        async with self.client.stream("POST", self.url, json=body, headers=headers) as resp:
            yield resp


class Ideal(Router):
    def __init__(self, client: httpx2.AsyncClient, nodes: list[str]) -> None:
        super().__init__(client, "")
        self.nodes = nodes
        self.inflight = dict.fromkeys(nodes, 0)

    @asynccontextmanager
    async def stream(self, body: dict[str, Any], headers: dict[str, str]) -> AsyncIterator[Any]:
        node = min(self.nodes, key=lambda n: (self.inflight[n] + 1) / SPEEDS[self.nodes.index(n)])
        self.inflight[node] += 1
        try:
            url = node + "/v1/chat/completions"
            async with self.client.stream("POST", url, json=body, headers=headers) as resp:
                yield resp
        finally:
            self.inflight[node] -= 1


async def one(router: Router, item: Item, t0: float, out: list[dict[str, float]]) -> None:
    _, prompt, max_tokens, headers = item
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    sent = time.perf_counter()
    first = None
    try:
        async with router.stream(body, headers) as resp:
            ok = resp.status_code == 200
            async for _ in resp.aiter_raw():
                if first is None:
                    first = time.perf_counter()
    except httpx2.HTTPError:
        ok = False
    end = time.perf_counter()
    out.append(
        {
            "start": sent - t0,
            "end": end - t0,
            "latency": end - sent,
            "ttft": (first or end) - sent,
            "ok": float(ok),
        }
    )


async def open_loop(router: Router, items: list[Item]) -> list[dict[str, float]]:
    out: list[dict[str, float]] = []
    tasks = []
    t0 = time.perf_counter()
    for item in items:
        delay = t0 + item[0] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(router, item, t0, out)))
    await asyncio.wait(tasks, timeout=120)
    return out


async def closed_loop(router: Router, concurrency: int, seconds: float) -> float:
    """Completions per second over the last 2/3 of a closed-loop run."""
    items = schedule(1000.0, 1000.0, seed=99)
    out: list[dict[str, float]] = []
    stop = time.perf_counter() + seconds
    t0 = time.perf_counter()
    feed = iter(items)

    async def worker() -> None:
        while time.perf_counter() < stop:
            await one(router, next(feed), t0, out)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    window = [r for r in out if r["end"] >= seconds / 3 and r["end"] <= seconds]
    return len(window) / (seconds * 2 / 3)


def summarize(out: list[dict[str, float]], warmup: float, seconds: float) -> dict[str, float]:
    kept = [r for r in out if warmup <= r["start"] < seconds]
    good = [r for r in kept if r["ok"]]
    lat = sorted(r["latency"] for r in good)
    ttft = sorted(r["ttft"] for r in good)

    def q(values: list[float], p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")

    return {
        "requests": len(kept),
        "errors": len(kept) - len(good),
        "p50": q(lat, 0.5),
        "p99": q(lat, 0.99),
        "ttft_p50": q(ttft, 0.5),
        "ttft_p99": q(ttft, 0.99),
        "throughput": len(good) / (seconds - warmup),
    }


async def poll_loads(fleet: LMFleet, loads: NodeLoads, client: httpx2.AsyncClient) -> None:
    """The light poller behind `least_load`: every node's /metrics, 4 times a second."""
    while True:
        local = {n.url: n.inflight for n in fleet.nodes}
        for url, inflight in local.items():
            try:
                reply = await client.get(url + "/metrics", timeout=1)
                queue = parse_queue(reply.content)
            except httpx2.HTTPError:
                continue
            if queue is not None:
                loads.report(url, queue, inflight)
        await asyncio.sleep(0.25)


async def run_ours(strategy: str, nodes: list[str], items: list[Item]) -> list[dict[str, float]]:
    loads = NodeLoads()
    chosen: Any = LeastLoad(loads) if strategy == "least_load" else strategy
    fleet = LMFleet.attach(nodes, strategy=chosen, health_interval=1.0)
    fleet.wait_ready(timeout=30)
    limits = httpx2.Limits(max_connections=1024, max_keepalive_connections=1024)
    inner = httpx2.AsyncHTTPTransport(limits=limits)
    timeout = httpx2.Timeout(120)
    poller = None
    async with (
        httpx2.AsyncClient(
            transport=AsyncFleetTransport(fleet.router, inner), timeout=timeout
        ) as c,
        httpx2.AsyncClient(timeout=timeout) as side,
    ):
        if strategy == "least_load":
            poller = asyncio.create_task(poll_loads(fleet, loads, side))
        try:
            return await open_loop(Router(c, PLACEHOLDER + "/v1/chat/completions"), items)
        finally:
            if poller is not None:
                poller.cancel()
            fleet.close()


async def run_url(url: str, items: list[Item]) -> list[dict[str, float]]:
    limits = httpx2.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(120), limits=limits) as c:
        return await open_loop(Router(c, url + "/v1/chat/completions"), items)


async def run_ideal(nodes: list[str], items: list[Item]) -> list[dict[str, float]]:
    limits = httpx2.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(120), limits=limits) as c:
        return await open_loop(Ideal(c, nodes), items)


def reset(nodes: list[str]) -> None:
    for node in nodes:
        httpx2.post(node + "/sim/stats/reset", timeout=5)


def prefix_schedule(rate: float, seconds: float, seed: int) -> list[Item]:
    """Multi-turn chats: 24 sessions, each a long system prompt + a growing history."""
    rng = random.Random(seed)
    systems = [f"session {s} system: " + "policy text " * 600 for s in range(24)]
    history: list[str] = ["" for _ in systems]
    items, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return items
        s = rng.randrange(len(systems))
        history[s] += f" turn {len(items)}: a question and its answer " * 10
        items.append((t, systems[s] + history[s], rng.randint(8, 64), {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=4)
    parser.add_argument("--parts", default="single,multi,prefix")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "routing.json")
    args = parser.parse_args()
    if args.child:  # one of the 4 independent clients of the multi-client case
        spec = json.loads(args.child)
        items = schedule(spec["rate"], spec["seconds"], seed=spec["seed"])
        out = asyncio.run(run_ours(spec["strategy"], spec["nodes"], items))
        print(json.dumps(out))
        return
    pin_self(LOAD_CPU)
    print(f"{machine()}; load average {load_average():.2f}", flush=True)
    results: dict[str, Any] = {"machine": machine()}
    parts = args.parts.split(",")
    with procs() as group:
        nodes = []
        for speed in SPEEDS:
            nodes += start_sims(group, 1, PROXY_CPU, *NODE_FLAGS, "--speed", str(speed))
        capacity = asyncio.run(_capacity(nodes, concurrency=int(1.5 * 16 * len(nodes)), seconds=12))
        results["capacity"] = capacity
        print(f"capacity (ideal router, closed loop): {capacity:.1f} req/s", flush=True)
        if "single" in parts:
            results["single"] = _single(group, nodes, capacity, args)
        if "multi" in parts:
            results["multi"] = _multi(nodes, capacity, args)
        if "prefix" in parts:
            results["prefix"] = _prefix(nodes, capacity, args)
    save_json(args.out, results)
    print()
    print(report(results))


async def _capacity(nodes: list[str], concurrency: int, seconds: float) -> float:
    limits = httpx2.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(120), limits=limits) as c:
        return await closed_loop(Ideal(c, nodes), concurrency, seconds)


def _single(group: Any, nodes: list[str], capacity: float, args: Any) -> list[dict[str, Any]]:
    rows = []
    theirs = [f"lmdeploy:{s}" for s in LMDEPLOY] if Path(LMDEPLOY_PY).exists() else []
    routers = [f"lmfleet:{s}" for s in OURS] + theirs + ["ideal"]
    proxies: dict[str, str] = {}
    for load in LOADS:
        items = schedule(load * capacity, args.seconds, seed=int(load * 100))
        for name in routers:
            reset(nodes)
            kind, _, strategy = name.partition(":")
            if kind == "lmfleet":
                out = asyncio.run(run_ours(strategy, nodes, items))
            elif kind == "lmdeploy":
                if strategy not in proxies:
                    _, proxies[strategy] = start_lmdeploy(group, nodes, strategy, uvloop=False)
                out = asyncio.run(run_url(proxies[strategy], items))
            else:
                out = asyncio.run(run_ideal(nodes, items))
            row = {"router": name, "load": load, **summarize(out, args.warmup, args.seconds)}
            rows.append(row)
            print(
                f"  load {load:.0%} {name:34s} p50 {row['p50']:6.2f} s  p99 {row['p99']:6.2f} s"
                f"  TTFT p50 {row['ttft_p50']:6.3f} p99 {row['ttft_p99']:6.3f} s"
                f"  {row['throughput']:5.1f} req/s  errors {row['errors']}",
                flush=True,
            )
    return rows


def _multi(nodes: list[str], capacity: float, args: Any) -> list[dict[str, Any]]:
    rows = []
    for load in (0.8, 0.95):
        for strategy in ("least_connections", "least_load"):
            reset(nodes)
            children = []
            for k in range(4):
                spec = {
                    "rate": load * capacity / 4,
                    "seconds": args.seconds,
                    "seed": 1000 + k,
                    "strategy": strategy,
                    "nodes": nodes,
                }
                argv = ["taskset", "-c", LOAD_CPU, PY, "-m", "bench.routing_quality"]
                argv += ["--child", json.dumps(spec)]
                children.append(
                    subprocess.Popen(
                        argv,
                        stdout=subprocess.PIPE,
                        text=True,
                        cwd=ROOT,
                        preexec_fn=die_with_parent,
                    )
                )
            out = []
            for child in children:
                stdout, _ = child.communicate(timeout=args.seconds + 180)
                out += json.loads(stdout.strip().splitlines()[-1])
            row = {"router": f"4 clients, {strategy}", "load": load}
            row |= summarize(out, args.warmup, args.seconds)
            rows.append(row)
            print(
                f"  multi load {load:.0%} {strategy:20s} p50 {row['p50']:6.2f} s"
                f"  p99 {row['p99']:6.2f} s  TTFT p99 {row['ttft_p99']:6.3f} s"
                f"  errors {row['errors']}",
                flush=True,
            )
    return rows


def _prefix(nodes: list[str], capacity: float, args: Any) -> list[dict[str, Any]]:
    rows = []
    items = prefix_schedule(0.5 * capacity, args.seconds, seed=7)
    for strategy in ("least_connections", "prefix_affinity"):
        reset(nodes)
        out = asyncio.run(run_ours(strategy, nodes, items))
        stats = [httpx2.get(n + "/sim/stats", timeout=5).json() for n in nodes]
        prompt = sum(s["prompt_tokens"] for s in stats)
        cached = sum(s["cached_tokens"] for s in stats)
        row = {"router": f"lmfleet:{strategy}", "load": 0.5}
        row |= summarize(out, args.warmup, args.seconds)
        row["cache_hit"] = cached / max(1, prompt)
        rows.append(row)
        print(
            f"  prefix {strategy:20s} TTFT p50 {row['ttft_p50']:6.3f} p99 {row['ttft_p99']:6.3f} s"
            f"  p99 {row['p99']:6.2f} s  cache hit {row['cache_hit']:.0%}",
            flush=True,
        )
    return rows


def report(results: dict[str, Any]) -> str:
    out = [f"capacity {results['capacity']:.1f} req/s"]
    heads = ["load", "router", "p50 s", "p99 s", "TTFT p50 s", "TTFT p99 s", "req/s", "errors"]
    for part in ("single", "multi", "prefix"):
        rows = results.get(part)
        if not rows:
            continue
        body = [
            [f"{r['load']:.0%}", r["router"], f"{r['p50']:.2f}", f"{r['p99']:.2f}",
             f"{r['ttft_p50']:.3f}", f"{r['ttft_p99']:.3f}", f"{r['throughput']:.1f}",
             r["errors"]] + ([f"{r['cache_hit']:.0%}"] if "cache_hit" in r else [])
            for r in rows
        ]  # fmt: skip
        extra = ["prefix cache hit"] if part == "prefix" else []
        out.append(f"{part}\n\n" + table(heads + extra, body))
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
