"""RL weight updates: how long one update cycle takes, and what it costs the traffic.

One cycle is `fleet.update_weights(payload, version=v, rolling=R)` on 4 `lmfleet sim`
nodes started as `LMFleet.simulate(weight_updates=True)` starts them (`--backend
pytorch --distributed-executor-backend ray`, LMDeploy 0.18's precondition). Modes:
all at once (`rolling=False`, an RL sync step: every node leaves routing together),
`rolling=1` and `rolling=2` (that many nodes at a time while the others serve).

The cycle is run unrolled, as `update_weights` runs it (lmfleet/weights/methods.py):
one `with fleet.weight_update(v, nodes=group, allow_mixed=bool(R))` per group of
`lmfleet.weights.rolling.groups`, so that each phase can be timed on its own:

- enter: take the group out of routing, drain its in-flight requests, `/sleep`,
  `/wakeup?tags=weights`;
- push: `update.push(payload)`, one `POST /update_weights` with `finished: true`;
  the sim then sleeps `--weights-gb x --update-seconds-per-gb` seconds (the load);
- exit: `/wakeup?tags=kv_cache`, `/is_sleeping`, back into routing at version v.

Sims: `--ttft-ms 40 --tpot-ms 10` (a 7-8B model on one GPU), natural output length
32-64 tokens by prompt hash (`max_tokens` 64), `--max-batch 4`, and a 16 GB model
loading at 0.05 s/GB (0.8 s). Two loads, each with a fresh fleet per mode: idle (no
traffic), and a closed loop of `--concurrency` (16) workers sending non-streaming
chat completions through `fleet.async_client(max_retries=0)`. 16 = 4 nodes x
max-batch 4: a fleet kept full, as an RL rollout keeps it, so a node out of routing
is capacity lost (`--max-batch 64` gives every node spare room instead).

Under load every repetition is a baseline window of `--window` seconds without an
update, then a window of the same length that starts with the update: requests
completed per second and tokens per second in each, failed requests, and the
latency of requests that overlapped the update (vs. requests overlapping a span of
the same length in the baseline window). Repetitions differ in their prompts, hence
in their output lengths.

The bench process (fleet and client) runs on core 0, the sims on core 1.

    .venv/bin/python -m bench.weight_update [--reps 5] [--window 10] [--concurrency 16]
        [--weights-gb 16] [--seconds-per-gb 0.05] [--max-batch 4] [--modes all,rolling1,rolling2]
        [--loads idle,load] [--out PATH] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import openai

from bench._common import LOAD_CPU, PROXY_CPU, ROOT, load_average, machine, publish, table
from lmfleet import LMFleet
from lmfleet.weights.rolling import groups
from lmfleet.weights.session import UPDATABLE

MODES: dict[str, bool | int] = {"all": False, "rolling1": 1, "rolling2": 2}
MODE_TITLES = {"all": "all at once", "rolling1": "rolling=1", "rolling2": "rolling=2"}
LOADS = ("idle", "load")
PAYLOAD = "bench-weights"
"""One small body: the sim cannot load tensors; the load cost is its sleep."""
VERSION_HEADER = "x-lmfleet-weight-version"
REQUEST_TIMEOUT = 60.0
IDLE_PAUSE = 0.3
"""Seconds between two idle cycles, so that each starts from a settled fleet."""


@dataclass(frozen=True)
class Settings:
    """Everything a run is configured with; saved beside the results."""

    nodes: int = 4
    reps: int = 5
    concurrency: int = 16
    max_tokens: int = 64
    window: float = 10.0
    warmup: float = 2.0
    weights_gb: float = 16.0
    seconds_per_gb: float = 0.05
    ttft_ms: float = 40.0
    tpot_ms: float = 10.0
    output_tokens: int = 32
    max_batch: int = 4
    """Per node: 4 x 4 = the 16 workers, so a node out of routing is capacity lost."""
    modes: tuple[str, ...] = tuple(MODES)
    loads: tuple[str, ...] = LOADS
    fresh_fleet: bool = True
    """A fresh fleet per (mode, load); False shares one (the quick mode)."""
    pin: bool = False
    seed: int = 0

    def sim_args(self) -> list[str]:
        """The same `lmfleet sim` flags for every configuration."""
        return [
            *("--ttft-ms", f"{self.ttft_ms:g}", "--tpot-ms", f"{self.tpot_ms:g}"),
            *("--output-tokens", str(self.output_tokens)),
            *("--output-tokens-max", str(self.max_tokens)),
            *("--max-batch", str(self.max_batch)),
            *("--weights-gb", f"{self.weights_gb:g}"),
            *("--update-seconds-per-gb", f"{self.seconds_per_gb:g}"),
        ]


QUICK = Settings(
    reps=1, window=2.0, warmup=0.5, concurrency=8, seconds_per_gb=0.01, fresh_fleet=False
)
"""The smoke test: one repetition per cell, on one shared fleet, a 0.16 s load."""


# -- one cycle ------------------------------------------------------------------------


@dataclass
class Phase:
    """One group's `with fleet.weight_update(...)`: its nodes and the three phase times."""

    nodes: list[str]
    enter: float
    push: float
    exit: float
    updated: list[str]
    failed: dict[str, str]
    result_seconds: float
    """The fleet's own `UpdateResult.seconds` for the group."""


@dataclass
class Cycle:
    """One whole update to `version` (every group); times are `time.monotonic()`."""

    mode: str
    version: int
    start: float
    end: float
    phases: list[Phase] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def total(self, name: str) -> float:
        """A phase's time summed over the groups (they run one after another)."""
        return float(sum(getattr(p, name) for p in self.phases))

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "version": self.version,
            "seconds": self.seconds,
            "enter_s": self.total("enter"),
            "push_s": self.total("push"),
            "exit_s": self.total("exit"),
            "result_seconds": self.total("result_seconds"),
            "updated": sum(len(p.updated) for p in self.phases),
            "failed": {u: why for p in self.phases for u, why in p.failed.items()},
            "groups": [asdict(p) for p in self.phases],
        }


def updatable(fleet: LMFleet) -> list[str]:
    """The nodes a fleet-wide update takes, in fleet order (as `update_weights` picks)."""
    return [n.url for n in fleet.nodes if n.state in UPDATABLE]


def timed_group(fleet: LMFleet, version: int, nodes: list[str], mixed: bool) -> Phase:
    """One group's update, with its entry, push and exit timed separately."""
    t0 = time.monotonic()
    with fleet.weight_update(version, nodes=nodes, allow_mixed=mixed) as update:
        t1 = time.monotonic()
        update.push(PAYLOAD)
        t2 = time.monotonic()
    t3 = time.monotonic()
    result = update.result
    assert result is not None
    return Phase(
        nodes=list(nodes),
        enter=t1 - t0,
        push=t2 - t1,
        exit=t3 - t2,
        updated=list(result.updated),
        failed=dict(result.failed),
        result_seconds=result.seconds,
    )


def timed_cycle(fleet: LMFleet, version: int, mode: str) -> Cycle:
    """`fleet.update_weights(PAYLOAD, version=, rolling=)`, unrolled to time its phases."""
    rolling = MODES[mode]
    cycle = Cycle(mode, version, time.monotonic(), 0.0)
    for group in groups(updatable(fleet), rolling):
        cycle.phases.append(timed_group(fleet, version, group, bool(rolling)))
    cycle.end = time.monotonic()
    return cycle


# -- the closed-loop load -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Done:
    """One request of the load: when it was sent and ended, and how."""

    sent: float
    done: float
    ok: bool
    tokens: int
    version: str | None
    error: str


def prompt(seed: int, worker: int, index: int) -> str:
    """A distinct prompt per request: the sim's output length is a hash of it."""
    return f"rollout {seed}-{worker}-{index}: continue the episode."


async def one_request(client: openai.AsyncOpenAI, model: str, text: str, max_tokens: int) -> Done:
    """Send one chat completion; every failure is a data point, never raised."""
    sent = time.monotonic()
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": text}],
            max_tokens=max_tokens,
        )
        reply = raw.parse()
        tokens = reply.usage.completion_tokens if reply.usage else 0
        return Done(sent, time.monotonic(), True, tokens, raw.headers.get(VERSION_HEADER), "")
    except Exception as exc:  # noqa: BLE001 - a failed request is what we count
        return Done(sent, time.monotonic(), False, 0, None, f"{type(exc).__name__}: {exc}"[:200])


async def worker(
    client: openai.AsyncOpenAI,
    model: str,
    settings: Settings,
    index: int,
    stop: asyncio.Event,
    log: list[Done],
) -> None:
    """One closed-loop stream: the next request as soon as the last one ends."""
    count = 0
    while not stop.is_set():
        text = prompt(settings.seed, index, count)
        log.append(await one_request(client, model, text, settings.max_tokens))
        count += 1


# -- measures -------------------------------------------------------------------------


def quantile(values: Sequence[float], p: float) -> float:
    """Nearest-rank quantile (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def window_stats(log: Sequence[Done], start: float, length: float) -> dict[str, Any]:
    """Requests that ended in [start, start + length): goodput and failures."""
    ended = [d for d in log if start <= d.done < start + length]
    ok = [d for d in ended if d.ok]
    return {
        "start": start,
        "seconds": length,
        "completed": len(ok),
        "failed": len(ended) - len(ok),
        "tokens": sum(d.tokens for d in ok),
        "rps": len(ok) / length,
        "tps": sum(d.tokens for d in ok) / length,
        "errors": sorted({d.error for d in ended if not d.ok})[:5],
    }


def overlap_stats(log: Sequence[Done], start: float, end: float) -> dict[str, Any]:
    """Latency of the requests in flight at any time in [start, end]."""
    over = [d for d in log if d.sent < end and d.done > start]
    latencies = [1000 * (d.done - d.sent) for d in over if d.ok]
    return {
        "requests": len(over),
        "failed": len(over) - len(latencies),
        "p50_ms": quantile(latencies, 0.5),
        "p99_ms": quantile(latencies, 0.99),
        "max_ms": max(latencies, default=math.nan),
        "latencies_ms": [round(x, 1) for x in latencies],
    }


def versions_served(log: Sequence[Done], start: float, end: float, new: int) -> dict[str, int]:
    """Requests that ended during the cycle, by the version that answered (old / new)."""
    ended = [d for d in log if start <= d.done <= end and d.ok]
    fresh = sum(d.version == str(new) for d in ended)
    return {"new": fresh, "old": len(ended) - fresh}


def failed_during(log: Sequence[Done], cycle: Cycle, window: float) -> list[str]:
    """Failed requests that overlapped the cycle or ended in its window (each once)."""
    return [
        d.error
        for d in log
        if not d.ok
        and (cycle.start <= d.done < cycle.start + window or d.sent < cycle.end)
        and d.done > cycle.start
    ]


def loaded_row(log: Sequence[Done], base: float, cycle: Cycle, window: float) -> dict[str, Any]:
    """One repetition under load: the baseline window, the update window, the overlap."""
    failed = failed_during(log, cycle, window)
    return {
        "failed": len(failed),
        "failed_errors": sorted(set(failed))[:5],
        "mode": cycle.mode,
        "cycle": cycle.to_json(),
        "covered": cycle.seconds <= window,
        "baseline": window_stats(log, base, window),
        "update": window_stats(log, cycle.start, window),
        "overlap": overlap_stats(log, cycle.start, cycle.end),
        "baseline_overlap": overlap_stats(log, base, base + cycle.seconds),
        "versions": versions_served(log, cycle.start, cycle.end, cycle.version),
    }


# -- configurations -------------------------------------------------------------------


def idle_reps(
    fleet: LMFleet, mode: str, settings: Settings, versions: Iterator[int]
) -> list[dict[str, Any]]:
    """`reps` cycles on an idle fleet."""
    rows = []
    for _ in range(settings.reps):
        cycle = timed_cycle(fleet, next(versions), mode)
        rows.append({"mode": mode, "cycle": cycle.to_json()})
        time.sleep(IDLE_PAUSE)
    return rows


async def loaded_reps(
    fleet: LMFleet, mode: str, settings: Settings, versions: Iterator[int]
) -> tuple[list[dict[str, Any]], list[Done]]:
    """`reps` x (baseline window, update window) under the closed-loop load."""
    log: list[Done] = []
    rows: list[dict[str, Any]] = []
    stop = asyncio.Event()
    client = fleet.async_client(max_retries=0, timeout=REQUEST_TIMEOUT)
    async with client:
        tasks = [
            asyncio.create_task(worker(client, fleet.model, settings, k, stop, log))
            for k in range(settings.concurrency)
        ]
        try:
            await asyncio.sleep(settings.warmup)
            for _ in range(settings.reps):
                base = time.monotonic()
                await asyncio.sleep(settings.window)
                cycle = await asyncio.to_thread(timed_cycle, fleet, next(versions), mode)
                await asyncio.sleep(max(0.0, cycle.start + settings.window - time.monotonic()))
                rows.append(loaded_row(log, base, cycle, settings.window))
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    return rows, log


def run_config(
    fleet: LMFleet, mode: str, load: str, settings: Settings, versions: Iterator[int]
) -> dict[str, Any]:
    """One (mode, load) cell on a ready fleet: its repetitions and a few fleet facts."""
    started = time.monotonic()
    if load == "idle":
        rows = idle_reps(fleet, mode, settings, versions)
        requests = failed = 0
    else:
        rows, log = asyncio.run(loaded_reps(fleet, mode, settings, versions))
        requests, failed = len(log), sum(not d.ok for d in log)
    return {
        "mode": mode,
        "load": load,
        "reps": rows,
        "requests": requests,
        "failed_total": failed,
        "versions_end": sorted({n.weight_version for n in fleet.nodes}),
        "seconds": time.monotonic() - started,
    }


# -- fleets and pinning ---------------------------------------------------------------


def pin_threads(pid: int, cpus: str) -> None:
    """Every thread of `pid` onto `cpus` (affinity is per thread on Linux)."""
    mask = {int(c) for c in cpus.split(",")}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task.name), mask)


def children(pid: int) -> list[int]:
    """Direct children of `pid` (the sims a fleet started)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


@contextlib.contextmanager
def started_fleet(settings: Settings) -> Iterator[LMFleet]:
    """A fresh fleet of `settings.nodes` sims, ready; pinned when `settings.pin`.

    The sims start on both cores (their imports are most of the start-up time), then
    move to LOAD_CPU; this process's threads go to PROXY_CPU."""
    me = os.getpid()
    if settings.pin:
        pin_threads(me, f"{PROXY_CPU},{LOAD_CPU}")
    before = set(children(me))
    with LMFleet.simulate(
        nodes=settings.nodes, weight_updates=True, sim_args=settings.sim_args()
    ) as fleet:
        fleet.wait_ready(timeout=120, min_ready=settings.nodes)
        if settings.pin:
            for pid in set(children(me)) - before:
                pin_threads(pid, LOAD_CPU)
            pin_threads(me, PROXY_CPU)
        yield fleet


def run_bench(settings: Settings, progress: bool = False) -> dict[str, Any]:
    """Every (load, mode) cell of `settings`: the raw results (saved as JSON)."""
    versions = iter(range(1, 1_000_000))
    cells = [(load, mode) for load in settings.loads for mode in settings.modes]
    configs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        shared = None if settings.fresh_fleet else stack.enter_context(started_fleet(settings))
        for load, mode in cells:
            with contextlib.ExitStack() as own:
                fleet = shared or own.enter_context(started_fleet(settings))
                configs.append(run_config(fleet, mode, load, settings, versions))
            if progress:
                print(progress_line(configs[-1]), flush=True)
    return {"settings": asdict(settings), "sim_args": settings.sim_args(), "configs": configs}


def progress_line(config: dict[str, Any]) -> str:
    cycles = [r["cycle"]["seconds"] for r in config["reps"]]
    line = f"  {config['load']:4s} {config['mode']:8s} cycle {spread(cycles, '{:.2f}')} s"
    if config["load"] == "load":
        ratio = [r["update"]["rps"] / r["baseline"]["rps"] for r in config["reps"]]
        failed = sum(r["failed"] for r in config["reps"])
        line += f"  goodput ratio {spread(ratio, '{:.2f}')}  failed {failed}"
    return line + f"  ({config['seconds']:.0f} s)"


# -- report ---------------------------------------------------------------------------


def spread(values: Sequence[float], fmt: str) -> str:
    """Median (min-max) of the repetitions."""
    values = [v for v in values if v == v]
    if not values:
        return "-"
    mid = fmt.format(statistics.median(values))
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return mid if low == high else f"{mid} ({low}-{high})"


def cycle_table(configs: Sequence[dict[str, Any]]) -> str:
    """Cycle time and its phases, per mode and load."""
    rows = []
    for config in configs:
        cycles = [r["cycle"] for r in config["reps"]]
        rows.append(
            [
                MODE_TITLES[config["mode"]],
                config["load"],
                spread([c["seconds"] for c in cycles], "{:.2f}"),
                spread([c["enter_s"] for c in cycles], "{:.2f}"),
                spread([c["push_s"] for c in cycles], "{:.2f}"),
                spread([c["exit_s"] for c in cycles], "{:.3f}"),
                spread([len(c["groups"]) for c in cycles], "{:.0f}"),
                sum(len(c["failed"]) for c in cycles),
            ]
        )
    heads = ["mode", "load", "cycle s", "enter s", "push s", "exit s", "groups", "nodes failed"]
    return table(heads, rows)


def pooled(rows: Sequence[dict[str, Any]], key: str, p: float) -> float:
    """A latency quantile over every repetition's overlapping requests together."""
    return quantile([x for r in rows for x in r[key]["latencies_ms"]], p)


def pooled_pair(rows: Sequence[dict[str, Any]]) -> str:
    base, update = pooled(rows, "baseline_overlap", 0.99), pooled(rows, "overlap", 0.99)
    return f"{base:.0f} / {update:.0f}"


def goodput_table(configs: Sequence[dict[str, Any]]) -> str:
    """Under load: the update window against the baseline window."""
    out = []
    for config in configs:
        if config["load"] != "load":
            continue
        reps = config["reps"]
        base = [r["baseline"] for r in reps]
        upd = [r["update"] for r in reps]
        out.append(
            [
                MODE_TITLES[config["mode"]],
                spread([b["rps"] for b in base], "{:.1f}"),
                spread([u["rps"] for u in upd], "{:.1f}"),
                spread([u["rps"] / b["rps"] for u, b in zip(upd, base, strict=True)], "{:.3f}"),
                spread([b["tps"] for b in base], "{:.0f}"),
                spread([u["tps"] for u in upd], "{:.0f}"),
                spread(
                    [b["completed"] - u["completed"] for u, b in zip(upd, base, strict=True)],
                    "{:.0f}",
                ),
                sum(r["failed"] for r in reps),
            ]
        )
    heads = ["mode", "req/s base", "req/s update", "ratio", "tok/s base", "tok/s update"]
    heads += ["completions lost", "failed"]
    return table(heads, out)


def latency_table(configs: Sequence[dict[str, Any]]) -> str:
    """Under load: latency of requests that overlapped the update vs the baseline."""
    out = []
    for config in configs:
        if config["load"] != "load":
            continue
        reps = config["reps"]
        over = [r["overlap"] for r in reps]
        base = [r["baseline_overlap"] for r in reps]
        mixed = [r["versions"]["old"] for r in reps]
        out.append(
            [
                MODE_TITLES[config["mode"]],
                spread([o["requests"] for o in over], "{:.0f}"),
                spread([b["p50_ms"] for b in base], "{:.0f}"),
                spread([o["p50_ms"] for o in over], "{:.0f}"),
                spread([b["p99_ms"] for b in base], "{:.0f}"),
                spread([o["p99_ms"] for o in over], "{:.0f}"),
                pooled_pair(reps),
                spread(mixed, "{:.0f}"),
            ]
        )
    heads = ["mode", "requests overlapping", "p50 ms base", "p50 ms update", "p99 ms base"]
    heads += ["p99 ms update", "pooled p99 base / update", "old-version answers in cycle"]
    return table(heads, out)


def report(results: dict[str, Any]) -> str:
    configs = results["configs"]
    meta = results["settings"]
    parts = [
        f"{meta['nodes']} sim nodes, `{' '.join(results['sim_args'])}`; "
        f"{meta['reps']} repetitions per cell (median, min-max); "
        f"{'a fresh fleet per cell' if meta['fresh_fleet'] else 'one fleet for every cell'}.",
        "Update cycle (seconds; a phase's time is summed over the groups)\n\n"
        + cycle_table(configs),
    ]
    if any(c["load"] == "load" for c in configs):
        parts += [
            f"Goodput under load ({meta['concurrency']} closed-loop workers, max_tokens "
            f"{meta['max_tokens']}): requests and tokens completed per second in a "
            f"{meta['window']:g} s window that starts with the update vs. the "
            f"{meta['window']:g} s window just before it\n\n" + goodput_table(configs),
            "Latency of requests in flight during the update vs. during a span of the same "
            "length in the baseline window (per-repetition p50/p99, median and min-max; "
            "pooled: every repetition's requests together)\n\n" + latency_table(configs),
        ]
    return "\n\n".join(parts)


def markdown_section(results: dict[str, Any]) -> str:
    return (
        "## RL weight updates: all at once vs rolling\n\n"
        f"`{('.venv/bin/python -m bench.weight_update ' + results['argv']).strip()}` on "
        f"{results['machine']}; raw numbers in `{results['out']}`.\n\n" + report(results) + "\n"
    )


# -- main -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 rep, one fleet")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--window", type=float, help="seconds per goodput window")
    parser.add_argument("--concurrency", type=int, help="closed-loop workers")
    parser.add_argument("--weights-gb", type=float, help="sim model size")
    parser.add_argument("--seconds-per-gb", type=float, help="sim load cost per GB")
    parser.add_argument("--max-batch", type=int, help="sim batch size per node")
    parser.add_argument("--modes", help="comma-separated: " + ",".join(MODES))
    parser.add_argument("--loads", help="comma-separated: idle,load")
    parser.add_argument(
        "--out",
        type=Path,
        help="results JSON (default bench/results/weight_update.json, _quick with --quick)",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.out is None:  # a smoke test never overwrites the full run's results
        name = "weight_update_quick.json" if args.quick else "weight_update.json"
        args.out = ROOT / "bench" / "results" / name
    given = {
        "reps": args.reps,
        "window": args.window,
        "concurrency": args.concurrency,
        "weights_gb": args.weights_gb,
        "seconds_per_gb": args.seconds_per_gb,
        "max_batch": args.max_batch,
        "modes": tuple(args.modes.split(",")) if args.modes else None,
        "loads": tuple(args.loads.split(",")) if args.loads else None,
    }
    settings = replace(settings, pin=True, **{k: v for k, v in given.items() if v is not None})
    for mode in settings.modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}")
    for load in settings.loads:
        if load not in LOADS:
            raise SystemExit(f"unknown load {load!r}")
    return settings, args


def main() -> None:
    settings, args = parse_args()
    logging.getLogger("lmfleet").setLevel(logging.WARNING)
    load = load_average()
    print(f"{machine()}; load average {load:.2f}", flush=True)
    started = time.monotonic()
    results = run_bench(settings, progress=True)
    out: Path = args.out
    results |= {
        "machine": machine(),
        "load_average_start": load,
        "argv": " ".join(sys.argv[1:]),
        "out": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out),
        "seconds": time.monotonic() - started,
    }
    publish(out, results, markdown_section(results))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
