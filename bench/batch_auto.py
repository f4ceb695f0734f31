"""A batch beside an interactive user: fixed concurrency 8 / 32 / 128 / 512 against `auto`.

Three `lmfleet sim` nodes of different speeds (`--speed` 1, 0.6, 0.375 over
`--tpot-ms 3`: 3, 5 and 8 ms per token; each decodes
at most 16 sequences at once, `--max-batch 16`; `--ttft-ms 20`; natural output
lengths 16..64 tokens by prompt; no prefix cache, so every run prefills alike). A
`chat_many` of 600 prompts runs with each concurrency setting; beside it, an
interactive user (a second fleet on the same nodes, as another process would be:
it sees the batch only through the nodes' `/metrics`) sends one chat request of 16
tokens every 50 ms while the batch runs, one at a time.

Measured per run: the batch's time, node utilisation (each node's `running` / 16,
sampled every 100 ms during the batch) and the interactive requests' p50 and p99
latency. Every setting runs on the same three nodes, idle between runs, once per
seed (the seed picks the prompts; the settings' order rotates with the seed).
Means with 95 % t-intervals over the seeds.

    .venv/bin/python -m bench.batch_auto [--seeds 10] [--prompts 600]
        [--settings 8,32,128,512,auto] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx2

from bench._common import machine
from lmfleet import LMFleet

SPEEDS = (1.0, 0.6, 0.375)  # --speed: tpot 3, 5 and 8 ms
MAX_BATCH = 16
SIM_ARGS = [
    "--max-batch", str(MAX_BATCH), "--ttft-ms", "20", "--tpot-ms", "3", "--output-tokens", "16",
    "--output-tokens-max", "64", "--prefix-cache-blocks", "0", "--health-poll-interval", "0.2",
]  # fmt: skip
SETTINGS = ("8", "32", "128", "512", "auto")
INTERACTIVE_EVERY = 0.05
T_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


@dataclass
class Run:
    setting: str
    seed: int
    seconds: float
    utilisation: float
    interactive_p50: float
    interactive_p99: float
    interactive_count: int


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


class Sampler:
    """Each node's `running` share of its batch, every 100 ms, in a thread."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.shares: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        with httpx2.Client(timeout=5) as client:
            while not self._stop.wait(0.1):
                for url in self.urls:
                    running = client.get(url + "/sim/stats").json()["running"]
                    self.shares.append(min(1.0, running / MAX_BATCH))


async def interactive(user: LMFleet, stop: asyncio.Event) -> list[float]:
    client = user.async_client(max_retries=0)
    latencies = []
    while not stop.is_set():
        started = time.monotonic()
        await client.chat.completions.create(
            model=user.model,
            messages=[{"role": "user", "content": f"hi {started}"}],
            max_tokens=16,
        )
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(INTERACTIVE_EVERY)
    return latencies


async def one_run(batch: LMFleet, user: LMFleet, setting: str, seed: int, prompts: int) -> Run:
    asked = [[{"role": "user", "content": f"seed {seed} prompt {i}"}] for i in range(prompts)]
    concurrency: Any = setting if setting == "auto" else int(setting)
    stop = asyncio.Event()
    beside = asyncio.create_task(interactive(user, stop))
    urls = [n.url for n in batch.nodes]
    with Sampler(urls) as sampler:
        started = time.monotonic()
        result = await batch.achat_many(
            asked, concurrency=concurrency, max_concurrency=512, progress=False
        )
        seconds = time.monotonic() - started
    stop.set()
    latencies = await beside
    assert len(result.ok) == prompts, result.summary()
    return Run(
        setting,
        seed,
        seconds,
        statistics.fmean(sampler.shares) if sampler.shares else 0.0,
        quantile(latencies, 0.5),
        quantile(latencies, 0.99),
        len(latencies),
    )


def run_all(seeds: int, prompts: int, settings: list[str]) -> list[Run]:
    runs = []
    with LMFleet.simulate(
        len(SPEEDS), speed=SPEEDS, sim_args=SIM_ARGS, health_interval=0.2
    ) as batch:
        batch.wait_ready(timeout=120)
        with LMFleet.attach([n.url for n in batch.nodes], health_interval=0.2) as user:
            user.wait_ready(timeout=60)
            for seed in range(seeds):
                order = settings[seed % len(settings) :] + settings[: seed % len(settings)]
                for setting in order:
                    run = asyncio.run(one_run(batch, user, setting, seed, prompts))
                    print(
                        f"{setting:>4} seed {seed}: {run.seconds:6.2f} s, util "
                        f"{run.utilisation:4.2f}, interactive p50 {run.interactive_p50:5.3f} "
                        f"p99 {run.interactive_p99:5.3f} s ({run.interactive_count})",
                        flush=True,
                    )
                    runs.append(run)
    return runs


def interval(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:,.3f}"
    half = T_95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:,.3f} ± {half:,.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=600)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = args.settings.split(",")
    runs = run_all(args.seeds, args.prompts, settings)
    by: dict[str, list[Run]] = {s: [r for r in runs if r.setting == s] for s in settings}
    print(f"\n{machine()}, {args.prompts} prompts, {args.seeds} seeds, 95 % intervals\n")
    print("| concurrency | batch s | utilisation | interactive p50 s | interactive p99 s |")
    print("|---|---|---|---|---|")
    for setting, rows in by.items():
        print(
            f"| {setting} | {interval([r.seconds for r in rows])} "
            f"| {interval([r.utilisation for r in rows])} "
            f"| {interval([r.interactive_p50 for r in rows])} "
            f"| {interval([r.interactive_p99 for r in rows])} |"
        )
    if "auto" in by:
        mean = {s: statistics.fmean(r.seconds for r in rows) for s, rows in by.items()}
        p99 = {s: statistics.fmean(r.interactive_p99 for r in rows) for s, rows in by.items()}
        fixed = [s for s in by if s != "auto"]
        best = min(fixed, key=mean.__getitem__)
        as_fast = [s for s in fixed if mean[s] <= mean["auto"] * 1.05]
        print(f"\nauto / best fixed ({best}): {mean['auto'] / mean[best]:.3f}x time")
        if as_fast:
            worst = max(as_fast, key=p99.__getitem__)
            print(
                f"interactive p99 beside the worst fixed setting as fast as auto ({worst}): "
                f"{p99[worst] / p99['auto']:.2f}x auto's"
            )
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in runs], indent=1))


if __name__ == "__main__":
    main()
