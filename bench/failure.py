"""Failure handling: goodput and latency when one of 3 nodes is faulty.

Three `lmfleet sim` nodes (ttft 10 ms + 2 ms per token, 16 output tokens, about
45 ms a request); one of them, at a seeded position in the node list, is faulty:

- black hole: `--error-rate 1 --error-status 500`, an instant HTTP 500 for every
  generation request while /health stays green;
- hung: `--hang`, generation requests are accepted and never answered, while
  /health stays green.

Systems, each with fresh nodes (and a fresh proxy) per cell, so that no state
carries over: `lmfleet serve` with every routing strategy (`proxy:S`); the
in-process client transport, `LMFleet.attach(urls, strategy=S)` then
`fleet.async_client(max_retries=0)` (`client:S`); LMDeploy 0.18's
`lmdeploy serve proxy` from `.venv-peer` (`make peer`) with each of its strategies
(`lmdeploy:S`). lmfleet gets `first_byte_timeout=T` (`--first-byte-timeout`);
outlier ejection runs with its defaults. LMDeploy's proxy gets its one bound,
`AIOHTTP_TIMEOUT=T` (it then answers 200 with an `error_code` body, which counts
as a failure). Same configuration in both scenarios.

Load: a real `openai.AsyncOpenAI(max_retries=0)` sends N small chat requests
(max_tokens 16) at a fixed concurrency; 16 sessions, each a long system prompt
(what `prefix_affinity` keys on) and its own question. A request is ok when it
gets a 200 with non-empty content within the per-request timeout. Recorded per
cell: ok / total, p50 / p99 latency of ok requests, wall time, requests the
faulty node received (its GET /sim/stats) and, for lmfleet, the faulty node's
state at the end (/nodes/status, or `fleet.nodes`). Seed s puts the faulty node
at position s mod 3 of the node list (first, second, last: order matters to some
strategies) and changes the prompts; tables show the median and min-max across
seeds. A cell stops starting requests after --cell-deadline seconds; those not
sent count as failures (marked *).

Nodes and the client run on core 1; a proxy on core 0.

    .venv/bin/python -m bench.failure [--requests 300] [--concurrency 8] [--seeds 3]
        [--scenarios blackhole,hung] [--systems proxy,client,lmdeploy | proxy:random,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai

from bench._common import (
    LOAD_CPU,
    MODEL,
    PROXY_CPU,
    PY,
    ROOT,
    Procs,
    free_port,
    get_json,
    load_average,
    machine,
    pin_self,
    post_json,
    procs,
    publish,
    sim_argv,
    table,
    wait_all_healthy,
    wait_http,
)
from bench.proxy_overhead import LMDEPLOY_PY, register
from lmfleet import LMFleet

SCENARIOS: dict[str, tuple[str, ...]] = {
    "blackhole": ("--error-rate", "1", "--error-status", "500"),
    "hung": ("--hang",),
}
SCENARIO_TITLES = {
    "blackhole": "black hole: node answers every generation with an instant HTTP 500",
    "hung": "hung: node accepts generations and never answers",
}
OURS = (
    "random",
    "round_robin",
    "least_connections",
    "min_observed_latency",
    "power_of_two",
    "prefix_affinity",
)
LMDEPLOY = ("random", "min_expected_latency", "min_observed_latency")
NODE_FLAGS = ("--ttft-ms", "10", "--tpot-ms", "2", "--output-tokens", "16")
NODES = 3
SESSIONS = 16
CHAT_PATH = "/v1/chat/completions"
READY_TIMEOUT = 60.0
NOT_SENT = "not sent (cell deadline)"


def lmdeploy_missing() -> str | None:
    """Why LMDeploy's proxy cannot run here, or None when it can."""
    if not Path(LMDEPLOY_PY).exists():
        failed = ROOT / ".venv-peer.failed"
        why = failed.read_text().strip() if failed.exists() else "run `make peer`"
        return f"no {LMDEPLOY_PY} ({why})"
    try:
        subprocess.run(
            [LMDEPLOY_PY, "-c", "import lmdeploy.serve.proxy.proxy"],
            capture_output=True,
            check=True,
            timeout=120,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"lmdeploy.serve.proxy does not import in .venv-peer: {exc}"
    return None


# -- nodes and systems ----------------------------------------------------------------


def start_nodes(
    group: Procs, scenario: str, seed: int
) -> tuple[list[subprocess.Popen[bytes]], list[str], str]:
    """3 fresh sims, one faulty: (processes, node list in seeded order, faulty url).

    They start on both cores (their imports are most of a cell's set-up time);
    `ready_nodes` pins them to LOAD_CPU once they answer.
    """
    started, urls = [], []
    for k in range(NODES):
        port = free_port()
        extra = SCENARIOS[scenario] if k == 0 else ()
        argv = sim_argv(port, *NODE_FLAGS, "--seed", str(seed * 10 + k), *extra)
        started.append(group.start(argv, f"{PROXY_CPU},{LOAD_CPU}"))
        urls.append(f"http://127.0.0.1:{port}")
    fault = urls[0]
    healthy = urls[1:]
    random.Random(seed).shuffle(healthy)
    healthy.insert(seed % NODES, fault)  # seed s: the faulty node is s mod 3 in the list
    return started, healthy, fault


def ready_nodes(started: Sequence[subprocess.Popen[bytes]], urls: Sequence[str]) -> None:
    for url in urls:
        wait_http(url + "/health", timeout=READY_TIMEOUT)
    for proc in started:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{proc.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), {int(LOAD_CPU)})


def stop_all(group: Procs) -> None:
    """SIGTERM every process of the cell at once; `group.close()` then reaps them."""
    for proc in group.started:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    group.close()


def start_lmdeploy(group: Procs, strategy: str, first_byte_timeout: float) -> str:
    """LMDeploy's proxy with no node yet; its own per-request bound: AIOHTTP_TIMEOUT."""
    port = free_port()
    argv = [LMDEPLOY_PY, "-m", "lmdeploy", "serve", "proxy", "--server-name", "127.0.0.1"]
    argv += ["--server-port", str(port), "--routing-strategy", strategy, "--disable-cache-status"]
    argv += ["--log-level", "ERROR"]
    env = {
        "UVICORN_LOG_LEVEL": "warning",
        "AIOHTTP_TIMEOUT": str(lmdeploy_timeout(first_byte_timeout)),
    }
    group.start(argv, PROXY_CPU, env=env)
    return f"http://127.0.0.1:{port}"


def lmdeploy_timeout(first_byte_timeout: float) -> int:
    return max(1, round(first_byte_timeout))  # LMDeploy reads an int


def register_lmdeploy(url: str, nodes: Sequence[str]) -> None:
    wait_http(url + "/nodes/status", timeout=120)
    status = get_json(url + "/nodes/status")
    for stale in status if isinstance(status, dict) else ():
        if stale not in nodes:
            post_json(url + "/nodes/remove", {"url": stale})
    register(url, list(nodes))


def start_lmfleet_proxy(
    group: Procs, nodes: Sequence[str], strategy: str, flags: Sequence[str]
) -> str:
    port = free_port()
    argv = [PY, "-m", "lmfleet.cli", "serve", "--port", str(port), "--log-level", "WARNING"]
    argv.append("--disable-cache-status")  # as LMDeploy's here: nothing kept on disk
    argv += ["--strategy", strategy, *flags]
    for node in nodes:
        argv += ["--node", node]
    group.start(argv, PROXY_CPU)
    url = f"http://127.0.0.1:{port}"
    wait_all_healthy(url, nodes, READY_TIMEOUT)
    return url


# -- the load ---------------------------------------------------------------------------


def messages(seed: int, i: int) -> list[dict[str, str]]:
    session = (i * 7 + seed) % SESSIONS
    system = f"session {seed}-{session}: you are a careful assistant. " + "policy text " * 30
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"question {i}: what is {i} plus {seed}?"},
    ]


def classify(exc: BaseException) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIStatusError):
        return f"http {exc.status_code}"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    return type(exc).__name__


async def drive(
    client: openai.AsyncOpenAI, requests: int, concurrency: int, seed: int, deadline: float
) -> tuple[list[dict[str, Any]], float]:
    """`requests` chat calls from `concurrency` workers; no new one starts after `deadline` s."""
    results: list[dict[str, Any]] = []
    feed = iter(range(requests))
    t0 = time.perf_counter()

    async def worker() -> None:
        for i in feed:
            if time.perf_counter() - t0 > deadline:
                results.append({"ok": False, "latency": 0.0, "error": NOT_SENT})
                continue
            sent = time.perf_counter()
            error = ""
            try:
                reply = await client.chat.completions.create(
                    model=MODEL,
                    messages=messages(seed, i),
                    max_tokens=16,  # type: ignore[arg-type]
                )
                choices = getattr(reply, "choices", None) or []
                message = getattr(choices[0], "message", None) if choices else None
                if not getattr(message, "content", None):
                    error = "200 without content"
            except Exception as exc:  # noqa: BLE001 - every failure is a data point
                error = classify(exc)
            results.append({"ok": not error, "latency": time.perf_counter() - sent, "error": error})

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


async def drive_url(url: str, args: argparse.Namespace, timeout: float, seed: int) -> Any:
    client = openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout
    )
    async with client:
        return await drive(client, args.requests, args.concurrency, seed, args.cell_deadline)


async def drive_fleet(fleet: LMFleet, args: argparse.Namespace, timeout: float, seed: int) -> Any:
    client = fleet.async_client(max_retries=0, timeout=timeout)
    async with client:
        return await drive(client, args.requests, args.concurrency, seed, args.cell_deadline)


# -- one cell -------------------------------------------------------------------------


def node_requests(url: str) -> int | None:
    try:
        stats = get_json(url + "/sim/stats", timeout=5)
    except (OSError, ValueError):
        return None
    return int(stats.get("by_path", {}).get(CHAT_PATH, 0)) if isinstance(stats, dict) else None


def faulty_state_proxy(proxy: str, fault: str) -> dict[str, Any]:
    try:
        status = get_json(proxy + "/nodes/status", timeout=5)
    except (OSError, ValueError, urllib.error.URLError) as exc:
        return {"state": f"? ({type(exc).__name__})"}
    node = status.get(fault) if isinstance(status, dict) else None
    return node if isinstance(node, dict) else {"state": "absent"}


def faulty_state_fleet(fleet: LMFleet, fault: str) -> dict[str, Any]:
    for node in fleet.nodes:
        if node.url.rstrip("/") == fault:
            return dict(node.model_dump(mode="json"))
    return {"state": "absent"}


def run_cell(
    system: str, scenario: str, seed: int, args: argparse.Namespace, caps: dict[str, Any]
) -> dict[str, Any]:
    kind, _, strategy = system.partition(":")
    timeout = args.hung_timeout if scenario == "hung" else args.timeout
    row: dict[str, Any] = {"system": system, "scenario": scenario, "seed": seed}
    cell_start = time.monotonic()
    with procs() as group:
        started, nodes, fault = start_nodes(group, scenario, seed)
        row["faulty_position"] = nodes.index(fault)
        fleet = None
        try:
            if kind == "proxy":
                row["config"] = " ".join(caps["proxy_flags"])
                ready_nodes(started, nodes)
                url = start_lmfleet_proxy(group, nodes, strategy, caps["proxy_flags"])
                results, wall = asyncio.run(drive_url(url, args, timeout, seed))
                row["faulty_node"] = faulty_state_proxy(url, fault)
            elif kind == "client":
                row["config"] = json.dumps(caps["client_kwargs"])
                ready_nodes(started, nodes)
                fleet = LMFleet.attach(nodes, strategy=strategy, **caps["client_kwargs"])
                fleet.wait_ready(timeout=READY_TIMEOUT, min_ready=NODES)
                results, wall = asyncio.run(drive_fleet(fleet, args, timeout, seed))
                row["faulty_node"] = faulty_state_fleet(fleet, fault)
            else:
                bound = lmdeploy_timeout(args.first_byte_timeout)
                row["config"] = f"--routing-strategy {strategy}, AIOHTTP_TIMEOUT={bound}"
                url = start_lmdeploy(group, strategy, args.first_byte_timeout)  # starts meanwhile
                ready_nodes(started, nodes)
                register_lmdeploy(url, nodes)
                results, wall = asyncio.run(drive_url(url, args, timeout, seed))
            row["faulty_received"] = node_requests(fault)
            row["healthy_received"] = [node_requests(n) for n in nodes if n != fault]
        finally:
            if fleet is not None:
                fleet.close()
            stop_all(group)
    ok = sorted(r["latency"] for r in results if r["ok"])
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    row |= {
        "requests": len(results),
        "ok": len(ok),
        "goodput": len(ok) / max(1, len(results)),
        "p50_ms": 1000 * quantile(ok, 0.5),
        "p99_ms": 1000 * quantile(ok, 0.99),
        "wall_s": wall,
        "request_timeout_s": timeout,
        "errors": errors,
        "not_sent": sum(n for e, n in errors.items() if e.startswith(NOT_SENT)),
        "cell_s": time.monotonic() - cell_start,  # set-up and tear-down included
    }
    return row


def quantile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


# -- report ---------------------------------------------------------------------------


def spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "-"
    mid = fmt.format(statistics.median(values))
    if len(values) == 1 or min(values) == max(values):
        return mid
    return f"{mid} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def node_label(node: dict[str, Any]) -> str:
    label = str(node.get("state"))
    if "eject" in str(node.get("message") or "").lower() and "eject" not in label:
        label += " (ejected)"
    return label


def states(rows: list[dict[str, Any]]) -> str:
    seen = [node_label(r["faulty_node"]) for r in rows if "faulty_node" in r]
    if not seen:
        return "-"
    counts = {s: seen.count(s) for s in dict.fromkeys(seen)}
    return ", ".join(s if n == len(seen) else f"{s} x{n}" for s, n in counts.items())


def report(results: dict[str, Any]) -> str:
    rows: list[dict[str, Any]] = results["rows"]
    meta = results["settings"]
    out = [
        f"{meta['requests']} requests per run at concurrency {meta['concurrency']}, "
        f"{meta['seeds']} seed(s) (median, min-max across seeds); 3 nodes, one faulty. "
        f"lmfleet config: proxy `{meta['proxy_flags'] or '(defaults)'}`, client "
        f"`{meta['client_kwargs'] or '(defaults)'}`; LMDeploy `AIOHTTP_TIMEOUT="
        f"{lmdeploy_timeout(meta['first_byte_timeout'])}`.",
    ]
    for why in results.get("skipped", []):
        out.append(f"Skipped: {why}")
    heads = [
        "system",
        "goodput %",
        "p50 ms",
        "p99 ms",
        "wall s",
        "to faulty node",
        "faulty node at end",
    ]
    for scenario in meta["scenarios"]:
        here = [r for r in rows if r["scenario"] == scenario]
        if not here:
            continue
        body = []
        for system in dict.fromkeys(r["system"] for r in here):
            cell = [r for r in here if r["system"] == system]
            cut = "*" if any(r.get("not_sent") for r in cell) else ""
            body.append(
                [
                    system,
                    spread([100 * r["goodput"] for r in cell], "{:.1f}"),
                    spread([r["p50_ms"] for r in cell], "{:.0f}"),
                    spread([r["p99_ms"] for r in cell], "{:.0f}"),
                    spread([r["wall_s"] for r in cell], "{:.1f}") + cut,
                    spread(
                        [r["faulty_received"] for r in cell if r["faulty_received"] is not None],
                        "{:.0f}",
                    ),
                    states(cell),
                ]
            )
        timeout = here[0]["request_timeout_s"]
        title = f"{SCENARIO_TITLES[scenario]} (client timeout {timeout:g} s)"
        out.append(f"{title}\n\n" + table(heads, body))
        if any(r.get("not_sent") for r in here):
            out.append(
                f"\\* cut at the cell deadline: no request starts after "
                f"{meta['cell_deadline']:g} s; those not sent count as failures."
            )
    return "\n\n".join(out)


def markdown_section(results: dict[str, Any]) -> str:
    return (
        "## Failure handling: one faulty node of three\n\n"
        f"`{('.venv/bin/python -m bench.failure ' + results['settings']['argv']).strip()}` on "
        f"{results['machine']}; raw numbers in `{results['settings']['out']}`.\n\n"
        "Goodput: requests that got a 200 with content within the client timeout. "
        "`to faulty node`: generation requests the faulty node received (of every "
        "request, retries included). `proxy:` is `lmfleet serve`, `client:` the "
        "in-process transport, `lmdeploy:` LMDeploy 0.18's `lmdeploy serve proxy`.\n\n"
        + report(results)
        + "\n"
    )


# -- main -----------------------------------------------------------------------------


def all_systems(spec: str) -> list[str]:
    out: list[str] = []
    for item in spec.split(","):
        if item == "proxy":
            out += [f"proxy:{s}" for s in OURS]
        elif item == "client":
            out += [f"client:{s}" for s in OURS]
        elif item == "lmdeploy":
            out += [f"lmdeploy:{s}" for s in LMDEPLOY]
        elif ":" in item:
            out.append(item)
        elif item:
            raise SystemExit(f"unknown system {item!r}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scenarios", default="blackhole,hung")
    parser.add_argument("--systems", default="proxy,client,lmdeploy")
    parser.add_argument("--first-byte-timeout", type=float, default=2.0, help="lmfleet's, seconds")
    parser.add_argument("--timeout", type=float, default=10.0, help="client timeout, seconds")
    parser.add_argument(
        "--hung-timeout", type=float, default=5.0, help="client timeout in the hung scenario"
    )
    parser.add_argument(
        "--cell-deadline",
        type=float,
        default=30.0,
        help="no new request after this many s (they count as failures)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "failure.json")
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    for scenario in scenarios:
        if scenario not in SCENARIOS:
            raise SystemExit(f"unknown scenario {scenario!r}")
    pin_self(LOAD_CPU)
    logging.getLogger("lmfleet").setLevel(logging.ERROR)  # ejection notices would cut the rows
    print(f"{machine()}; load average {load_average():.2f}", flush=True)
    started = time.monotonic()

    t = f"{args.first_byte_timeout:g}"
    caps: dict[str, Any] = {
        "proxy_flags": ["--first-byte-timeout", t],
        "client_kwargs": {"first_byte_timeout": args.first_byte_timeout},
    }
    print(f"lmfleet proxy flags {caps['proxy_flags']}, client {caps['client_kwargs']}", flush=True)
    systems = all_systems(args.systems)
    skipped = []
    if any(s.startswith("lmdeploy:") for s in systems):
        why = lmdeploy_missing()
        if why:
            skipped.append(f"LMDeploy's proxy: {why}")
            print(f"  skipping LMDeploy: {why}", flush=True)
            systems = [s for s in systems if not s.startswith("lmdeploy:")]

    rows = []
    for scenario in scenarios:
        for system in systems:
            for seed in range(args.seeds):
                row = run_cell(system, scenario, seed, args, caps)
                rows.append(row)
                state = row.get("faulty_node", {}).get("state", "-")
                print(
                    f"  {scenario:9s} {system:32s} seed {seed}  ok {row['ok']:4d}/{row['requests']}"
                    f"  p50 {row['p50_ms']:7.0f}  p99 {row['p99_ms']:7.0f} ms"
                    f"  wall {row['wall_s']:5.1f} s (cell {row['cell_s']:4.1f})"
                    f"  faulty got {row['faulty_received']}"
                    f"  ({state})  errors {row['errors'] or '-'}",
                    flush=True,
                )
    argv = " ".join(sys.argv[1:])
    results = {
        "machine": machine(),
        "settings": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "seeds": args.seeds,
            "scenarios": scenarios,
            "first_byte_timeout": args.first_byte_timeout,
            "timeout": args.timeout,
            "hung_timeout": args.hung_timeout,
            "cell_deadline": args.cell_deadline,
            "node_flags": list(NODE_FLAGS),
            "proxy_flags": " ".join(caps["proxy_flags"]),
            "client_kwargs": json.dumps(caps["client_kwargs"]) if caps["client_kwargs"] else "",
            "argv": argv,
            "out": str(args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out),
        },
        "skipped": skipped,
        "rows": rows,
        "seconds": time.monotonic() - started,
    }
    publish(args.out, results, markdown_section(results))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
