"""One RL step with a weight update in the middle: drain vs abort+resubmit vs continue.

The step of an asynchronous RL trainer: 256 rollouts start at once on 4 `lmfleet
sim` nodes (token in, token out: LMDeploy's `/generate` with `input_ids`, through
`fleet.async_client(max_retries=0)`); when half of them have finished, the trainer
pushes new weights to every node (`fleet.aupdate_weights(..., in_flight=MODE)`);
the step ends when every rollout has an answer and the update is done.

Rollout lengths are long-tailed: `max_tokens` drawn from a log-normal with median
64 tokens and sigma 1.0, capped at 1,024 (`ignore_eos`, so each rollout is exactly
that long): most are short, a few are 10-15x the median, as RL rollouts are.

Modes, each from a fresh fleet, 10 seeds (`--seeds`) each:
- `none`: the same step without an update (the baseline);
- `drain`: `in_flight="drain"`: the update waits for the rollouts running on the
  nodes (every one of them, here) before it sleeps them;
- `abort`: `in_flight="abort"`: the update cuts them; each aborted rollout is
  resubmitted from scratch (its partial tokens are generated twice);
- `continue`: `in_flight="continue"`: the update cuts them and the fleet finishes
  each on a node after the update from what it had (transport/continuation.py);
- `continue-rolling`: the same, one node at a time (`rolling=1`, versions mixed
  meanwhile): a cut rollout goes on at once on a node that is serving.

Measured per step: step time; tokens generated twice (the nodes' own
`completion_tokens`, summed, minus the tokens in the final answers); prompt tokens
prefilled again (the nodes' `prompt_tokens` minus 256 prompts' worth: a
continuation re-reads its partial output); idle node-seconds (each node's
`running` count sampled every 20 ms: time with nothing running, asleep included);
goodput (tokens in the final answers per second of step). Means with 95 %
t-intervals over the seeds.

Sims: `--ttft-ms 20 --tpot-ms 4 --max-batch 64 --batch-slowdown 0.01`, a 16 GB
model loading at 0.05 s/GB (0.8 s per update). The bench, the fleet and the sims
share this machine's cores (no pinning).

    .venv/bin/python -m bench.rl_step [--seeds 10] [--modes none,drain,abort,continue]
        [--rollouts 256] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx2

from bench._common import machine
from lmfleet import LMFleet
from lmfleet.config import FleetOptions, RoutingOptions

URL = "http://lmfleet.invalid/generate"
SIM_ARGS = [
    "--ttft-ms", "20", "--tpot-ms", "4", "--max-batch", "64", "--batch-slowdown", "0.01",
    "--weights-gb", "16", "--update-seconds-per-gb", "0.05", "--output-tokens", "2000",
]  # fmt: skip
MODES = ("none", "drain", "abort", "continue", "continue-rolling")
IN_FLIGHT = {"drain": "drain", "abort": "abort", "continue": "continue"}
IN_FLIGHT["continue-rolling"] = "continue"
PROMPT_TOKENS = 32
T_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def lengths(seed: int, count: int) -> list[int]:
    """Long-tailed rollout lengths: log-normal, median 64, sigma 1.0, in [1, 1024]."""
    rng = random.Random(seed)
    return [max(1, min(1024, round(math.exp(rng.gauss(math.log(64), 1.0))))) for _ in range(count)]


@dataclass
class Step:
    mode: str
    seed: int
    seconds: float
    useful_tokens: int
    twice: int
    prefilled_again: int
    idle_node_seconds: float
    resubmitted: int
    update_seconds: float

    @property
    def goodput(self) -> float:
        return self.useful_tokens / self.seconds


class IdleMeter:
    """Samples every node's `running` count; idle = time a node runs nothing."""

    def __init__(self, urls: list[str], every: float = 0.02) -> None:
        self._urls = urls
        self._every = every
        self.idle = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> IdleMeter:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx2.Client(timeout=5) as http:
            last = time.monotonic()
            while not self._stop.is_set():
                running = [http.get(u + "/sim/stats").json()["running"] for u in self._urls]
                now = time.monotonic()
                self.idle += (now - last) * sum(1 for r in running if r == 0)
                last = now
                self._stop.wait(self._every)


def node_totals(urls: list[str]) -> tuple[int, int]:
    """(completion tokens, prompt tokens) the nodes counted, all together."""
    stats = [httpx2.get(u + "/sim/stats", timeout=5).json() for u in urls]
    return sum(s["completion_tokens"] for s in stats), sum(s["prompt_tokens"] for s in stats)


async def one_step(fleet: LMFleet, mode: str, seed: int, rollouts: int, version: int) -> Step:
    urls = [n.url for n in fleet.nodes]
    for url in urls:
        httpx2.post(url + "/sim/stats/reset", timeout=5).raise_for_status()
    client = fleet.async_client(max_retries=0, timeout=300)
    sizes = lengths(seed, rollouts)
    done = 0
    half = asyncio.Event()
    resubmitted = 0

    async def rollout(index: int) -> int:
        nonlocal done, resubmitted
        prompt = [7 + (seed * 7919 + index * 104729 + k) % 900 for k in range(PROMPT_TOKENS)]
        body = {"input_ids": prompt, "max_tokens": sizes[index], "ignore_eos": True}
        while True:
            answer = await client.post(URL, body=body, cast_to=object)
            reason = (answer["meta_info"]["finish_reason"] or {}).get("type")
            if reason != "abort":
                break
            resubmitted += 1  # abort+resubmit: the partial answer is thrown away
        done += 1
        if done * 2 >= rollouts:
            half.set()
        return len(answer["output_ids"])

    update_seconds = 0.0

    async def update() -> None:
        nonlocal update_seconds
        await half.wait()
        started = time.monotonic()
        rolling = 1 if mode.endswith("-rolling") else False
        result = await fleet.aupdate_weights(
            f"w{version}", version=version, rolling=rolling, in_flight=IN_FLIGHT[mode]
        )
        assert result.ok, result
        update_seconds = time.monotonic() - started

    with IdleMeter(urls) as meter:
        started = time.monotonic()
        tasks = [asyncio.ensure_future(rollout(i)) for i in range(rollouts)]
        if mode != "none":
            tasks.append(asyncio.ensure_future(update()))
        results = await asyncio.gather(*tasks)
        seconds = time.monotonic() - started
    useful = sum(r for r in results if r is not None)
    generated, prompts = node_totals(urls)
    return Step(
        mode=mode,
        seed=seed,
        seconds=seconds,
        useful_tokens=useful,
        twice=generated - useful,
        prefilled_again=prompts - rollouts * PROMPT_TOKENS - resubmitted * PROMPT_TOKENS,
        idle_node_seconds=meter.idle,
        resubmitted=resubmitted,
        update_seconds=update_seconds,
    )


def interval(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:,.2f}"
    half = T_95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:,.2f} ± {half:,.2f}"


def run_mode(mode: str, seeds: int, rollouts: int) -> list[Step]:
    steps = []
    # drain_timeout 600 s: `drain` really waits for every rollout on the nodes.
    options = FleetOptions(drain_timeout=600, routing=RoutingOptions(wait_for_node=120))
    with LMFleet.simulate(
        4, weight_updates=True, sim_args=SIM_ARGS, options=options, health_interval=0.5
    ) as fleet:
        fleet.wait_ready(timeout=120)
        for seed in range(seeds):
            step = asyncio.run(one_step(fleet, mode, seed, rollouts, version=seed + 1))
            print(
                f"{mode:9s} seed {seed}: {step.seconds:6.2f} s, twice {step.twice:6d}, "
                f"idle {step.idle_node_seconds:5.2f} node-s, resubmitted {step.resubmitted}",
                flush=True,
            )
            steps.append(step)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rollouts", type=int, default=256)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    steps: dict[str, list[Step]] = {}
    for mode in args.modes.split(","):
        steps[mode] = run_mode(mode, args.seeds, args.rollouts)
    base = statistics.fmean(s.seconds for s in steps["none"]) if "none" in steps else None
    print(f"\n{machine()}, {args.rollouts} rollouts, {args.seeds} seeds, 95 % intervals\n")
    print(
        "| mode | step s | vs none | update s | tokens twice | prompt tokens again "
        "| idle node-s | goodput tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode, rows in steps.items():
        seconds = [s.seconds for s in rows]
        ratio = f"{statistics.fmean(seconds) / base:.2f}x" if base else "-"
        print(
            f"| {mode} | {interval(seconds)} | {ratio} "
            f"| {interval([s.update_seconds for s in rows])} "
            f"| {interval([float(s.twice) for s in rows])} "
            f"| {interval([float(s.prefilled_again) for s in rows])} "
            f"| {interval([s.idle_node_seconds for s in rows])} "
            f"| {interval([s.goodput for s in rows])} |"
        )
    if args.out:
        data: dict[str, Any] = {m: [asdict(s) for s in rows] for m, rows in steps.items()}
        args.out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
