"""CPU cost of the health monitor: one fleet polling N nodes every second.

The nodes are N listening ports served by one child process (a minimal asyncio
HTTP responder answering `/health` like LMDeploy), so the figure is the cost in
the fleet's process alone: `process_time()` over a window, as % of one core.

    .venv/bin/python bench/monitor_cpu.py --nodes 64 --seconds 20 [--telemetry off|views|routing]

`--telemetry routing` (the default) is the dearest case: a `least_load` fleet reads
every node's `/metrics` each round beside `/health`. The responder answers like
LMDeploy 0.18: ~10 KB for a plain `/metrics`, and only the named samples for a
`name[]` query (prometheus_client's filter, which the monitor uses).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import subprocess
import sys
import time
from urllib.parse import parse_qsl, unquote

from lmfleet import FleetOptions, HealthOptions, LMFleet

BODY = b'{"status": "healthy", "message": ""}'
MODELS = b'{"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "lmdeploy"}]}'


def _metrics_text() -> bytes:
    """An LMDeploy 0.18-sized `/metrics` (the monitor reads it every round for least_load):
    its gauges and counters, plus the latency histograms and process metrics that make
    most of a real answer's bytes, for one engine."""
    labels = 'engine="0",model_name="m"'
    lines = [line for name in (
        "num_requests_running", "num_requests_waiting", "num_api_requests_waiting",
        "num_api_requests_routed", "num_requests_succeeded", "num_requests_failed",
        "gpu_cache_usage_perc", "prefix_cache_hit_rate", "prompt_tokens_total",
        "generation_tokens_total",
    ) for line in (
        f"# HELP lmdeploy:{name} Number of requests.",
        f"# TYPE lmdeploy:{name} {'counter' if name.endswith('_total') else 'gauge'}",
        f"lmdeploy:{name}{{{labels}}} 3.0",
    )]  # fmt: skip
    buckets = ["0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "+Inf"]
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                      "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_inference_time_seconds", "request_prefill_time_seconds",
                      "request_decode_time_seconds", "iteration_tokens_total"):  # fmt: skip
        lines.append(f"# HELP lmdeploy:{histogram} Histogram.")
        lines.append(f"# TYPE lmdeploy:{histogram} histogram")
        lines += [f'lmdeploy:{histogram}_bucket{{{labels},le="{b}"}} 12.0' for b in buckets]
        lines += [
            f"lmdeploy:{histogram}_sum{{{labels}}} 4.5",
            f"lmdeploy:{histogram}_count{{{labels}}} 12.0",
        ]
    lines += [f'python_gc_objects_collected_total{{generation="{g}"}} 1234.0' for g in range(3)]
    lines += ["process_cpu_seconds_total 12.5", "process_resident_memory_bytes 1.2e9"]
    return ("\n".join(lines) + "\n").encode()


METRICS = _metrics_text()


@functools.lru_cache(maxsize=16)
def _restricted(text: bytes, target: bytes) -> bytes:
    """What prometheus_client (which serves LMDeploy's `/metrics`) answers to a
    `name[]` query: only the named samples, with their HELP and TYPE lines."""
    names = {
        unquote(value).encode()
        for key, value in parse_qsl(target.partition(b"?")[2].decode())
        if key == "name[]"
    }
    if not names:
        return text
    kept = []
    for line in text.splitlines():
        parts = line.split(b" ", 3)
        name = parts[2] if line.startswith(b"# ") else line.split(b"{", 1)[0].split(b" ", 1)[0]
        if name in names:
            kept.append(line)
    return b"\n".join(kept) + b"\n"


async def _respond(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, whole: bool
) -> None:
    """Answer like LMDeploy; `whole`: every `/metrics` in full, as a server that
    ignores `name[]` would (`--whole`)."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0]
            target = line.split(b" ")[1]
            if target.startswith(b"/metrics"):
                body = METRICS if whole else _restricted(METRICS, target)
            else:
                body = MODELS if target == b"/v1/models" else BODY
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _serve(count: int, whole: bool) -> None:
    """Listen on `count` ports the kernel picks; print them on one line for the parent."""
    respond = functools.partial(_respond, whole=whole)
    servers = [await asyncio.start_server(respond, "127.0.0.1", 0) for _ in range(count)]
    print(" ".join(str(s.sockets[0].getsockname()[1]) for s in servers), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument(
        "--telemetry",
        choices=("off", "views", "routing"),
        default="routing",
        help="no /metrics reads; every 10 s (status views); every round (least_load)",
    )
    parser.add_argument(
        "--whole", action="store_true", help="nodes ignore name[] and answer all ~11 KB"
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.whole))
        return

    argv = [sys.executable, __file__, "--serve", str(args.nodes), *["--whole"] * args.whole]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        ports = [int(p) for p in child.stdout.readline().split()]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        options = FleetOptions(health=HealthOptions(telemetry=args.telemetry != "off"))
        strategy = "least_load" if args.telemetry == "routing" else "least_connections"
        with LMFleet.attach(
            urls, strategy=strategy, options=options, health_interval=args.interval
        ) as fleet:
            fleet.wait_ready(timeout=30, min_ready=args.nodes)
            time.sleep(2 * args.interval)  # settle: every node probed at least once
            if args.telemetry == "views":
                time.sleep(10)  # and its /metrics read once
            reporting = sum(node.queue is not None for node in fleet.nodes)
            cpu0, wall0 = time.process_time(), time.monotonic()
            time.sleep(args.seconds)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        probes = args.nodes * wall / (args.interval * 1.05)  # mean jitter is 5 %
        print(f"nodes={args.nodes} interval={args.interval}s window={wall:.1f}s")
        print(f"telemetry: {reporting} of {args.nodes} nodes report their /metrics load")
        print(f"fleet process CPU: {100 * cpu / wall:.2f}% of one core")
        print(f"about {1e6 * cpu / probes:.0f} us CPU per probe ({probes:.0f} probes)")
        print(f"pid {os.getpid()} python {sys.version.split()[0]}")
    finally:
        child.terminate()
        child.wait(timeout=10)


if __name__ == "__main__":
    main()
