"""Routing quality: each router as a ratio to a replayed reference and to a lower bound.

Method (issue 15, item 0):

- Nodes: three `lmfleet sim` nodes with the simulator's cost model, one 3x slower
  (speeds 1, 1, 0.333), max batch 8, fresh per cell. `--scale K` divides every time
  of the cost model by K (same ratios; the routers' health/telemetry interval is
  divided by K too); `--coarsen M` makes outputs M times shorter and TPOT M times
  longer, so a scaled run keeps each decode sleep long against timer overshoot.
- Workload (bench/routing_workload.py): per (cell, seed) one fixed schedule that
  every router gets, with exact output lengths (`max_tokens`, checked per run).
- Capacity is analytic (bench/routing_replay.py:capacity): requests/s with every
  batch slot busy at the mix's mean prompt and output; loads are 80 % / 95 % of it.
- Baselines per seed from a noise-free replay of the cost model on the same
  schedule (bench/routing_replay.py): a per-request lower bound (alone on the
  fastest node) and a reference (the best p99 of rules that know every output
  length and node state). `oracle` sends each request live to the node the
  reference chose: router / oracle cancels the live harness's own overhead.
- Statistics (bench/routing_stats.py, bench/routing_report.py): per seed
  p50/p90/p99; paired per-seed ratios; geometric mean over seeds with a bootstrap
  95 % interval; "within 15 %" only if the upper end is under 1.15.
- Fairness (bench/routing_live.py): idle, zeroed, cache-salted nodes per run; the
  router order rotates with the seed; LMDeploy's proxy gets the node speeds; a run
  is cut at 1.5 x the reference's makespan + 30 s / K (what is still running then
  is "cut": unbounded latency, so an overloaded router shows as such).

Cells (`--cells`, default all): single80/single95 (one client process),
multi80/multi95 (3 independent client processes, each its own router),
light_heavy (closed loop: a client with 32 in flight beside one with 2),
prefix80 (multi-turn chats sharing long prefixes, streamed for TTFT), and
replicas80/replicas95 (two proxy replicas in front of the same nodes).

    .venv/bin/python -m bench.routing_quality --offline              # baselines only
    .venv/bin/python -m bench.routing_quality --estimate --scale 8 --coarsen 4
    .venv/bin/python -m bench.routing_quality --check-replay --scale 8 --coarsen 4
    .venv/bin/python -m bench.routing_quality --cells single80 --seeds 10 --requests 1000 \
        --routers all --scale 8 --coarsen 4 --resume                 # one cell (~35 min)
    .venv/bin/python -m bench.routing_quality --table                # markdown from the JSON
    .venv/bin/python -m bench.routing_quality --table --versus lmdeploy:min_expected_latency

With `--resume`, runs already in `--out` are kept, so the matrix can be run a cell
(or a few seeds, `--seed-base`) at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench._common import ROOT, Procs, load_average, machine, pin_self, procs, save_json
from bench.routing_live import (
    ClientSpec,
    ScheduleSpec,
    node_stats,
    register_lmdeploy,
    register_speeds,
    reset_nodes,
    run_children,
    run_health,
    run_in_process,
    start_lmdeploy_proxy,
    start_lmfleet_serve,
    start_nodes,
    start_redis,
    wait_drained,
)
from bench.routing_replay import RULES, NodeModel, capacity, fleet, lower_bound, prepare, replay
from bench.routing_report import ORACLE, report, versus
from bench.routing_stats import summary
from bench.routing_workload import mix_means, run_salt
from lmfleet.config import HealthOptions

OUT = ROOT / "bench" / "results" / "routing_quality.json"
SPEEDS = (1.0, 1.0, 0.333)
MAX_BATCH = 8
DEFAULT_HEALTH_INTERVAL = HealthOptions().interval  # lmfleet's default, divided by --scale
DEADLINE_FACTOR, DEADLINE_SLACK_S = 1.5, 30.0  # a run is cut at 1.5 x reference + 30 s / scale

LMFLEET = (
    "random",
    "round_robin",
    "least_connections",
    "power_of_two",
    "prefix_affinity",
    "min_expected_latency",
    "min_observed_latency",
    "least_load",
    "least_load+speeds",
    "least_load+store",
)
"""`+speeds`: the client is given the node speeds, as LMDeploy's proxy is (`attach(speeds=)`,
or `status.speed` at `/nodes/add` for `lmfleet serve`). `+store` (replicas cells):
the `lmfleet serve` replicas share a Redis (`--store`), and with it each one's
requests in flight per node (lmfleet/proxy/shared.py); without it they know each
other's requests only from the nodes' `/metrics`."""
LMDEPLOY = ("random", "min_expected_latency", "min_observed_latency")
ROUTERS = (*(f"lmfleet:{s}" for s in LMFLEET), *(f"lmdeploy:{s}" for s in LMDEPLOY), ORACLE)
"""`oracle`: each request sent live straight to the node the replayed reference chose
for it; measures how far the live harness (HTTP, timers) sits from the replay."""


@dataclass(frozen=True)
class Cell:
    """One column of the matrix: a workload, its clients and how they reach the nodes.

    topology "clients": each client is its own router (its own process with an
    `LMFleet.attach`, or its own LMDeploy proxy); "replicas": one load generator
    spreads the requests over `clients` proxy replicas (`lmfleet serve` or LMDeploy's).
    `groups`: client indices also reported on their own (the light and heavy client).
    """

    name: str
    mix: str = "chat"
    load: float = 0.8
    clients: int = 1
    topology: str = "clients"
    concurrency: tuple[int, ...] = ()
    stream: bool = False
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def closed(self) -> bool:
        return bool(self.concurrency)

    def schedule_spec(self, seed: int, setup: Setup) -> ScheduleSpec:
        """The recipe of this cell's schedule for `seed` (rebuilt in every client process)."""
        return ScheduleSpec(
            self.mix,
            seed,
            setup.requests,
            rate=setup.rate(self),
            clients=self.clients,
            concurrency=self.concurrency,
            coarsen=setup.coarsen,
        )

    def all_groups(self) -> dict[str, tuple[int, ...] | None]:
        return {"all": None, **self.groups}


CELLS = {
    c.name: c
    for c in (
        Cell("single80", load=0.80),
        Cell("single95", load=0.95),
        Cell("multi80", load=0.80, clients=3),
        Cell("multi95", load=0.95, clients=3),
        Cell("light_heavy", clients=2, concurrency=(32, 2), groups={"heavy": (0,), "light": (1,)}),
        Cell("prefix80", mix="prefix", load=0.80, stream=True),
        Cell("replicas80", load=0.80, clients=2, topology="replicas"),
        Cell("replicas95", load=0.95, clients=2, topology="replicas"),
    )
}


@dataclass(frozen=True)
class Setup:
    """Everything the cells of one invocation share."""

    nodes: tuple[NodeModel, ...]
    scale: float
    coarsen: int
    requests: int
    seeds: tuple[int, ...]
    health_interval: float

    def capacity(self, cell: Cell) -> float:
        return capacity(self.nodes, mix_means(cell.mix, self.coarsen))

    def rate(self, cell: Cell) -> float:
        """Open loop: the cell's load times the analytic capacity (the same for every router)."""
        return 0.0 if cell.closed else cell.load * self.capacity(cell)

    def deadline(self, makespan: float) -> float:
        """When a run is cut (seconds after its start): far past any sound router's end."""
        return DEADLINE_FACTOR * makespan + DEADLINE_SLACK_S / self.scale

    def method(self) -> dict[str, Any]:
        return {
            "speeds": [n.speed for n in self.nodes],
            "max_batch": MAX_BATCH,
            "scale": self.scale,
            "coarsen": self.coarsen,
            "requests": self.requests,
            "seeds": list(self.seeds),
            "health_interval": self.health_interval,
            "nodes": [asdict(n) for n in self.nodes],
            "machine": machine(),
        }


def make_setup(args: argparse.Namespace) -> Setup:
    speeds = tuple(float(s) for s in args.speeds.split(",")) if args.speeds else SPEEDS
    base = fleet(speeds, max_batch=MAX_BATCH)
    nodes = tuple(n.scaled(args.scale).coarsened(args.coarsen) for n in base)
    interval = args.health_interval or DEFAULT_HEALTH_INTERVAL / args.scale
    seeds = tuple(range(args.seed_base, args.seed_base + args.seeds))
    return Setup(nodes, args.scale, args.coarsen, args.requests, seeds, interval)


# -- baselines (offline) ----------------------------------------------------------------


def baselines(cell: Cell, seed: int, setup: Setup) -> tuple[dict[str, Any], list[int]]:
    """Lower bound and every reference rule's percentiles for one (cell, seed).

    Per client group, the reference is the rule with the lowest p99. Also returns
    the node the "all" reference picked for each request (-1: never sent): the oracle.
    """
    sched = cell.schedule_spec(seed, setup).build()
    prepared = prepare(sched)
    bound, bound_ttft = lower_bound(sched, setup.nodes, prepared)
    results = {name: replay(sched, setup.nodes, rule, prepared) for name, rule in RULES.items()}
    out: dict[str, Any] = {"lower_bound": {}, "rules": {}, "best": {}}
    for group, clients in cell.all_groups().items():
        per_rule = {}
        for name, result in results.items():
            done = result.done(clients, sched)
            per_rule[name] = summary([result.latency[i] for i in done])
            per_rule[name]["ttft_p99"] = summary([result.ttft[i] for i in done])["p99"]
            prompt = sum(prepared.prompt_tokens[i] for i in done)
            per_rule[name]["cache_hit"] = sum(result.cached_tokens[i] for i in done) / prompt
        best = min(per_rule, key=lambda name: per_rule[name]["p99"])
        # The bound over the requests the reference sent (a closed loop sends a prefix).
        done = results[best].done(clients, sched)
        out["lower_bound"][group] = summary([bound[i] for i in done])
        out["lower_bound"][group]["ttft_p99"] = summary([bound_ttft[i] for i in done])["p99"]
        out["rules"][group] = per_rule
        out["best"][group] = best
    reference = results[out["best"]["all"]]
    out["makespan"] = reference.makespan
    return out, list(reference.node)


Assignments = dict[tuple[str, int], list[int]]


def offline(
    setup: Setup, cells: list[str], previous: dict[str, Any] | None
) -> tuple[dict[str, Any], Assignments]:
    """The results skeleton with every baseline (keeping runs from `previous`).

    Cells of `previous` not run now are kept whole: `--resume` adds to a file.
    """
    kept_cells = dict((previous or {}).get("cells", {}))
    results: dict[str, Any] = {"method": setup.method(), "cells": kept_cells}
    oracle: Assignments = {}
    for name in cells:
        cell = CELLS[name]
        started = time.monotonic()
        kept = (previous or {}).get("cells", {}).get(name, {}).get("seeds", {})
        seeds = {}
        for seed in setup.seeds:
            base, oracle[name, seed] = baselines(cell, seed, setup)
            seeds[str(seed)] = {"baselines": base, "runs": kept.get(str(seed), {}).get("runs", {})}
        results["cells"][name] = {
            "cell": asdict(cell),
            "capacity": setup.capacity(cell),
            "rate": setup.rate(cell),
            "seeds": seeds,
        }
        print(f"baselines {name}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return results, oracle


# -- live runs --------------------------------------------------------------------------


def router_order(routers: Sequence[str], seed: int) -> list[str]:
    """Rotate the order with the seed, so each router runs early and late equally often."""
    k = seed % len(routers)
    return [*routers[k:], *routers[:k]]


def lmfleet_available(strategy: str) -> str | None:
    """None when lmfleet resolves the strategy by name, else why not."""
    from lmfleet.routing import resolve_strategy

    try:
        resolve_strategy(strategy)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return f"{type(exc).__name__}: {exc}"
    return None


def _nothing() -> None:
    """Nothing to stop after the run."""


@dataclass
class CellRun:
    """What the runs of one cell share: fresh nodes, LMDeploy proxies, the oracle's picks.

    LMDeploy proxies start once per (strategy, instance) and are re-registered before
    each run (a fresh `Status` per node: counters and latency history); `lmfleet serve`
    replicas and every `LMFleet.attach` are new for each run.
    """

    cell: Cell
    setup: Setup
    group: Procs
    nodes: list[str]
    oracle: Assignments
    makespans: dict[int, float]
    proxies: dict[tuple[str, int], str] = field(default_factory=dict)
    redis: str | None = None

    def lmdeploy(self, strategy: str, count: int) -> list[str]:
        urls = []
        for k in range(count):
            if (strategy, k) not in self.proxies:
                self.proxies[strategy, k] = start_lmdeploy_proxy(self.group, strategy)
            url = self.proxies[strategy, k]
            register_lmdeploy(url, self.nodes, [n.speed for n in self.setup.nodes])
            urls.append(url)
        return urls

    def senders(self, router: str, seed: int) -> tuple[list[dict[str, Any]], Callable[[], None]]:
        """One sender per load generator for `router`, and what to stop after the run."""
        cell = self.cell
        kind, _, strategy = router.partition(":")
        strategy, _, variant = strategy.partition("+")
        speeds = [n.speed for n in self.setup.nodes] if variant == "speeds" else None
        if router == ORACLE:
            sender = {"kind": "assign", "urls": self.nodes, "assign": self.oracle[cell.name, seed]}
            count = 1 if cell.topology == "replicas" else cell.clients
            return [sender] * count, _nothing
        if cell.topology == "replicas":
            return self._replicas(kind, strategy, speeds, variant == "store")
        if kind == "lmdeploy":
            proxies = self.lmdeploy(strategy, cell.clients)
            return [{"kind": "urls", "urls": [url]} for url in proxies], _nothing
        sender = {
            "kind": "fleet",
            "strategy": strategy,
            "nodes": self.nodes,
            "health_interval": self.setup.health_interval,
            "speeds": speeds,
        }
        return [sender] * cell.clients, _nothing

    def _replicas(
        self, kind: str, strategy: str, speeds: list[float] | None, shared: bool
    ) -> tuple[list[dict[str, Any]], Callable[[], None]]:
        if kind == "lmdeploy":
            return [{"kind": "urls", "urls": self.lmdeploy(strategy, self.cell.clients)}], _nothing
        interval = self.setup.health_interval
        store = None
        if shared:  # one redis-server per cell; a fresh name (nothing left over) per run
            self.redis = self.redis or start_redis(self.group)
            store = (self.redis, f"run{uuid.uuid4().hex[:8]}")
        replicas = [
            start_lmfleet_serve(self.group, self.nodes, strategy, interval, store)
            for _ in range(self.cell.clients)
        ]
        if speeds is not None:  # as LMDeploy's proxy gets them: `status.speed` at /nodes/add
            for _, url in replicas:
                register_speeds(url, self.nodes, speeds)

        def stop() -> None:
            for proc, _ in replicas:
                self.group.stop(proc)

        return [{"kind": "urls", "urls": [url for _, url in replicas]}], stop

    def run(self, seed: int, router: str, position: int) -> dict[str, Any]:
        """One live run: its percentiles per client group and the checks that it is sound."""
        cell = self.cell
        recipe = cell.schedule_spec(seed, self.setup)
        salt = run_salt(seed, position)
        deadline = self.setup.deadline(self.makespans[seed])
        reset_nodes(self.nodes)
        senders, stop = self.senders(router, seed)
        alone = len(senders) == 1
        specs = [
            ClientSpec(recipe, None if alone else c, salt, cell.stream, sender, deadline)
            for c, sender in enumerate(senders)
        ]
        started = time.monotonic()
        try:
            records = run_in_process(specs[0]) if alone else run_children(specs, cell.closed)
            wait_drained(self.nodes)
        finally:
            stop()
        sched = recipe.build()
        ok = [r for r in records if r["ok"]]
        expected = sum(sched.requests[r["i"]].output_tokens for r in ok)
        out = {"position": position, "wall_s": time.monotonic() - started, "requests": len(records)}
        out |= run_health(records, node_stats(self.nodes), expected)
        out["groups"] = {
            name: group_summary(records, clients) for name, clients in cell.all_groups().items()
        }
        return out


def group_summary(records: list[dict[str, Any]], clients: tuple[int, ...] | None) -> dict[str, Any]:
    """Percentiles of one client group's successful requests; a censored one counts as +inf.

    An unbounded percentile (more censored requests than its tail) is stored as None.
    """
    mine = [r for r in records if clients is None or r["c"] in clients]
    latency = [r["latency"] for r in mine if r["ok"]] + [math.inf for r in mine if r["censored"]]
    out: dict[str, Any] = summary(latency)
    ttfts = [r["ttft"] for r in mine if r["ok"] and r["ttft"] is not None]
    out["ttft_p99"] = summary(ttfts)["p99"] if ttfts else None
    out["censored"] = sum(1 for r in mine if r["censored"])
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in out.items()}


def run_cell(
    cell: Cell,
    setup: Setup,
    routers: Sequence[str],
    results: dict[str, Any],
    oracle: Assignments,
    save: Callable[[], None],
) -> None:
    """Fresh nodes, then every seed with the routers in a rotated order; saves after each run."""
    seeds_out = results["cells"][cell.name]["seeds"]
    with procs() as group:
        makespans = {seed: seeds_out[str(seed)]["baselines"]["makespan"] for seed in setup.seeds}
        nodes = start_nodes(group, list(setup.nodes))
        live = CellRun(cell, setup, group, nodes, oracle, makespans)
        for seed in setup.seeds:
            runs = seeds_out[str(seed)]["runs"]
            for position, router in enumerate(router_order(routers, seed)):
                if "groups" in runs.get(router, {}):
                    continue  # --resume: done before
                kind, _, strategy = router.partition(":")
                strategy = strategy.partition("+")[0]  # "+speeds", "+store": variants
                missing = lmfleet_available(strategy) if kind == "lmfleet" else None
                if missing:
                    runs[router] = {"unavailable": missing}
                    continue
                print(f"[{cell.name} seed {seed}] {router} ...", end=" ", flush=True)
                try:
                    runs[router] = live.run(seed, router, position)
                except Exception as exc:  # noqa: BLE001 - record it, go on with the matrix
                    runs[router] = {"failed": f"{type(exc).__name__}: {exc}"}
                    print(f"failed: {exc}", flush=True)
                    continue
                finally:
                    save()
                _progress(runs[router])


def _progress(run: dict[str, Any]) -> None:
    p = run["groups"]["all"]
    tokens = "tokens ok" if run["tokens_generated"] == run["tokens_expected"] else "TOKENS DIFFER"

    def seconds(value: float | None) -> str:
        return "cut" if value is None else f"{value:.2f}"  # None: more than that share cut

    print(
        f"p50 {seconds(p['p50'])} p99 {seconds(p['p99'])} s, {run['errors']} errors, "
        f"{p.get('censored', 0)} cut, {tokens}, "
        f"client lag p99 {1000 * run['lag_p99']:.0f} ms, {run['wall_s']:.0f} s",
        flush=True,
    )


# -- how long the live matrix takes ------------------------------------------------------

# Measured in smoke runs: attach + wait_ready, 2-3 client processes starting,
# two `lmfleet serve` starting, drain and stats; per cell: 3 nodes, one LMDeploy proxy.
RUN_OVERHEAD_S = {"in_process": 1.0, "children": 4.0, "serve": 2.0, "drain": 0.5}
CELL_OVERHEAD_S = {"nodes": 3.0, "lmdeploy": 6.0}


def estimate(results: dict[str, Any], routers: Sequence[str]) -> tuple[float, float]:
    """Seconds of live runs, (if no router overloads, if every run is cut at its deadline).

    Each run takes its replayed makespan (or, at worst, its deadline) plus fixed
    overheads per run and per cell (measured on the 2-core machine).
    """
    low = high = 0.0
    lmdeploy = sum(1 for r in routers if r.startswith("lmdeploy:"))
    scale = results["method"]["scale"]
    for cell_out in results["cells"].values():
        cell = cell_out["cell"]
        fixed = CELL_OVERHEAD_S["nodes"] + lmdeploy * cell["clients"] * CELL_OVERHEAD_S["lmdeploy"]
        low, high = low + fixed, high + fixed
        children = cell["clients"] > 1 and cell["topology"] == "clients"
        per_run = RUN_OVERHEAD_S["drain"] + RUN_OVERHEAD_S["children" if children else "in_process"]
        for data in cell_out["seeds"].values():
            span = data["baselines"]["makespan"]
            cut = DEADLINE_FACTOR * span + DEADLINE_SLACK_S / scale
            for router in routers:
                serve = cell["topology"] == "replicas" and router.startswith("lmfleet:")
                extra = per_run + serve * RUN_OVERHEAD_S["serve"]
                low += span + extra
                high += cut + extra
    return low, high


# -- command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--cells", default="all", help=f"comma list of {', '.join(CELLS)}, or all")
    add(
        "--routers",
        default="all",
        help="comma list of lmfleet:NAME[+speeds], lmdeploy:NAME, oracle; or all",
    )
    add("--seeds", type=int, default=10)
    add("--seed-base", type=int, default=0)
    add("--requests", type=int, default=1000)
    add("--scale", type=float, default=1.0, help="divide the cost model's times by this")
    add("--coarsen", type=int, default=1, help="outputs this many times shorter, TPOT longer")
    add("--speeds", default="", help="comma list of node speeds (default 1,1,0.333)")
    add("--health-interval", type=float, default=0.0, help="lmfleet's; default 2 s / scale")
    add("--out", type=Path, default=OUT)
    add("--resume", action="store_true", help="keep the runs already in --out")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="baselines only, no processes")
    mode.add_argument("--estimate", action="store_true", help="how long the live runs take")
    mode.add_argument("--table", action="store_true", help="print the markdown of --out")
    add("--versus", default="", help="with --table: every router / this one at p50, p90, p99")
    mode.add_argument("--check-replay", action="store_true", help="one live node vs the replay")
    args = parser.parse_args(argv)
    if args.versus and not args.table:
        parser.error("--versus only shapes --table's output; add --table")
    return args


def selected(spec: str, known: Sequence[str], what: str) -> list[str]:
    """Names from a comma list ("all" = `known`); routers may be any lmfleet:/lmdeploy: name."""
    if spec == "all":
        return list(known)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if what == "router":
        bad = [n for n in names if n != ORACLE and not n.startswith(("lmfleet:", "lmdeploy:"))]
    else:
        bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"unknown {what}(s): {', '.join(bad)}; known: {', '.join(known)}")
    return names


def _comparable(method: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in method.items() if k not in ("machine", "seeds")}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        results = json.loads(args.out.read_text())
        print(versus(results, args.versus) if args.versus else report(results))
        return
    if args.check_replay:
        from bench.routing_check import check_replay

        pin_self()
        print(json.dumps(check_replay(args.scale, args.coarsen), indent=1))
        return
    setup = make_setup(args)
    cells = selected(args.cells, list(CELLS), "cell")
    routers = selected(args.routers, ROUTERS, "router")
    previous = json.loads(args.out.read_text()) if args.resume and args.out.exists() else None
    if previous and _comparable(previous["method"]) != _comparable(setup.method()):
        raise SystemExit(f"--resume: {args.out} was made with other settings; use another --out")
    results, oracle = offline(setup, cells, previous)
    if args.estimate:
        low, high = estimate(results, routers)
        runs = f"{len(cells)} cells x {len(setup.seeds)} seeds x {len(routers)} routers"
        print(f"{runs}: {low / 60:.0f} min of live runs ({high / 60:.0f} if every run is cut)")
        return
    if args.offline:
        save_json(args.out, results)
        print(report(results))
        return
    pin_self()
    print(f"{machine()}; load average {load_average():.2f}", flush=True)
    for name in cells:
        run_cell(CELLS[name], setup, routers, results, oracle, lambda: save_json(args.out, results))
    save_json(args.out, results)
    print(report(results))


if __name__ == "__main__":
    main()
