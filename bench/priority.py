"""An interactive user beside a batch job through one proxy, with and without request priority.

Three `lmfleet sim` nodes (the batch_auto bench's: `--speed` 1, 0.6 and 0.375 over
`--tpot-ms 3`, at most 16 sequences decoded at once each, `--max-batch 16`, the rest
queued FIFO as an engine queues them; `--ttft-ms 20`; outputs of 16..64 tokens)
behind one `lmfleet serve` proxy (`fleet.serve()`, default `least_load`). Through it,
a batch job (a plain openai client, 128 requests in flight, `prompts` prompts) and
an interactive user (a plain openai client, one chat of 16 tokens every 50 ms, one
at a time) run together. Two settings:

- `plain`: no priorities (every request the default, 0): the batch's requests fill
  the nodes' queues and the user's wait behind them;
- `priority`: the batch's requests carry `x-lmfleet-priority: -1` (background), so
  the proxy holds them while a node's batch is full (lmfleet/priority.py) and the
  user's requests meet at most a short queue in the node.

Measured: the user's p50, p90 and p99 latency while the batch runs, and the batch's
time. Each run gets a fresh fleet and proxy over the same idle nodes (nothing learnt
carries over: each learns its nodes' capacity from their `/metrics`), once per seed
(the seed picks the prompts; the two settings' order alternates with it). Means with
95 % t-intervals over the seeds; the p90 ratio is taken per seed (plain / priority).

    .venv/bin/python -m bench.priority [--seeds 10] [--prompts 1000] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import openai

from bench._common import machine
from bench.batch_auto import SIM_ARGS, SPEEDS, interval, quantile
from lmfleet import LMFleet

SETTINGS = ("plain", "priority")
BATCH_IN_FLIGHT = 128
INTERACTIVE_EVERY = 0.05


@dataclass
class Run:
    setting: str
    seed: int
    batch_seconds: float
    p50: float
    p90: float
    p99: float
    count: int


async def interactive(url: str, model: str, stop: asyncio.Event) -> list[float]:
    latencies = []
    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0) as client:
        while not stop.is_set():
            started = time.monotonic()
            await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"hi {started}"}],
                max_tokens=16,
            )
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(INTERACTIVE_EVERY)
    return latencies


async def batch(url: str, model: str, setting: str, seed: int, prompts: int) -> float:
    headers = {"x-lmfleet-priority": "-1"} if setting == "priority" else {}
    limit = asyncio.Semaphore(BATCH_IN_FLIGHT)
    async with openai.AsyncOpenAI(
        base_url=url, api_key="none", max_retries=0, timeout=300
    ) as client:

        async def one(i: int) -> None:
            async with limit:
                await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": f"seed {seed} prompt {i}"}],
                    max_tokens=64,
                    extra_headers=headers,
                )

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(prompts)))
        return time.monotonic() - started


async def one_run(urls: list[str], setting: str, seed: int, prompts: int) -> Run:
    with LMFleet.attach(urls, health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=60, min_ready=len(urls))
        server = fleet.serve(port=0)
        base = server.url + "/v1"
        stop = asyncio.Event()
        beside = asyncio.create_task(interactive(base, fleet.model, stop))
        seconds = await batch(base, fleet.model, setting, seed, prompts)
        stop.set()
        latencies = await beside
    return Run(
        setting,
        seed,
        seconds,
        quantile(latencies, 0.5),
        quantile(latencies, 0.9),
        quantile(latencies, 0.99),
        len(latencies),
    )


def run_all(seeds: int, prompts: int) -> list[Run]:
    runs = []
    with LMFleet.simulate(
        len(SPEEDS), speed=SPEEDS, sim_args=SIM_ARGS, health_interval=0.2
    ) as nodes:
        nodes.wait_ready(timeout=120)
        urls = [n.url for n in nodes.nodes]
        for seed in range(seeds):
            order = SETTINGS if seed % 2 == 0 else SETTINGS[::-1]
            for setting in order:
                run = asyncio.run(one_run(urls, setting, seed, prompts))
                print(
                    f"{setting:>8} seed {seed}: batch {run.batch_seconds:6.2f} s, interactive "
                    f"p50 {run.p50:5.3f} p90 {run.p90:5.3f} p99 {run.p99:5.3f} s ({run.count})",
                    flush=True,
                )
                runs.append(run)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = run_all(args.seeds, args.prompts)
    by = {s: sorted((r for r in runs if r.setting == s), key=lambda r: r.seed) for s in SETTINGS}
    print(f"\n{machine()}, {args.prompts} prompts, {args.seeds} seeds, 95 % intervals\n")
    print("| setting | interactive p50 s | p90 s | p99 s | batch s |")
    print("|---|---|---|---|---|")
    for setting, rows in by.items():
        print(
            f"| {setting} | {interval([r.p50 for r in rows])} | {interval([r.p90 for r in rows])} "
            f"| {interval([r.p99 for r in rows])} | {interval([r.batch_seconds for r in rows])} |"
        )
    ratios = [p.p90 / q.p90 for p, q in zip(by["plain"], by["priority"], strict=True)]
    slower = [
        q.batch_seconds / p.batch_seconds for p, q in zip(by["plain"], by["priority"], strict=True)
    ]
    print(f"\ninteractive p90, plain / priority (per seed): {interval(ratios)}x")
    print(f"batch time, priority / plain (per seed): {interval(slower)}x")
    print(f"mean of the ratios: {statistics.fmean(ratios):.2f}x")
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in runs], indent=1))


if __name__ == "__main__":
    main()
