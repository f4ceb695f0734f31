"""Client transport overhead: `fleet.async_client()` vs a plain `openai.AsyncOpenAI`.

One `lmfleet sim --fast --output-tokens 16` node on core 1. Each case runs in its
own child process pinned to core 0: N chat completions (non-streaming, or SSE with
16 chunks) at concurrency 1 or 64 through either client, pointed at the same node.
Reported: requests/s, process CPU time per request (all threads: the fleet's
monitor included), and the difference fleet - plain.

    .venv/bin/python bench/client_overhead.py [--requests 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

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

MESSAGES = [{"role": "user", "content": "Hello, how are you?"}]


async def _drive(client: object, requests: int, concurrency: int, stream: bool) -> None:
    create = client.chat.completions.create  # type: ignore[attr-defined]
    queue = iter(range(requests))

    async def worker() -> None:
        for _ in queue:
            if stream:
                chunks = await create(model=MODEL, messages=MESSAGES, max_tokens=16, stream=True)
                async for _chunk in chunks:
                    pass
            else:
                await create(model=MODEL, messages=MESSAGES, max_tokens=16)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def run_case(kind: str, node: str, requests: int, concurrency: int, stream: bool) -> dict:
    """In the child process: one case, measured after a warm-up."""
    import openai

    from lmfleet import LMFleet

    fleet = None
    if kind == "fleet":
        fleet = LMFleet.attach([node], health_interval=1.0)
        fleet.wait_ready(timeout=30)
        client = fleet.async_client(max_retries=0)
    else:
        client = openai.AsyncOpenAI(base_url=node + "/v1", api_key="none", max_retries=0)

    async def main() -> tuple[float, float]:
        await _drive(client, min(500, requests), concurrency, stream)  # warm-up
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await _drive(client, requests, concurrency, stream)
        return time.process_time() - cpu0, time.perf_counter() - wall0

    cpu, wall = asyncio.run(main())
    if fleet is not None:
        fleet.close()
    return {"rps": requests / wall, "cpu_us": 1e6 * cpu / requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "client.json")
    args = parser.parse_args()
    if args.case:
        kind, node, conc, stream = args.case.split("|")
        result = run_case(kind, node, args.requests, int(conc), stream == "1")
        print(json.dumps(result))
        return
    pin_self(LOAD_CPU)
    print(f"{machine()}; load average {load_average():.2f}", flush=True)
    rows = []
    with procs() as group:
        (node,) = start_sims(group, 1, LOAD_CPU, "--fast", "--output-tokens", "16")
        for stream in (False, True):
            for conc in (1, 64):
                result = {}
                for kind in ("plain", "fleet"):
                    case = f"{kind}|{node}|{conc}|{int(stream)}"
                    argv = ["taskset", "-c", PROXY_CPU, PY, "-m", "bench.client_overhead"]
                    argv += ["--requests", str(args.requests), "--case", case]
                    out = subprocess.run(
                        argv, capture_output=True, text=True, cwd=ROOT, timeout=300, check=True
                    )
                    result[kind] = json.loads(out.stdout.strip().splitlines()[-1])
                row = {"stream": stream, "concurrency": conc, **result}
                rows.append(row)
                plain, fleet = result["plain"], result["fleet"]
                print(
                    f"  {'stream' if stream else 'plain '} c={conc:<3d}"
                    f" plain {plain['rps']:7.0f} req/s {plain['cpu_us']:6.0f} us CPU/req |"
                    f" fleet {fleet['rps']:7.0f} req/s {fleet['cpu_us']:6.0f} us CPU/req",
                    flush=True,
                )
    save_json(args.out, {"machine": machine(), "rows": rows})
    body = []
    for r in rows:
        plain, fleet = r["plain"], r["fleet"]
        body.append(
            [
                "SSE 16 chunks" if r["stream"] else "non-streaming",
                r["concurrency"],
                f"{plain['rps']:,.0f}",
                f"{fleet['rps']:,.0f}",
                f"{100 * (fleet['rps'] / plain['rps'] - 1):+.1f}%",
                f"{plain['cpu_us']:.0f}",
                f"{fleet['cpu_us']:.0f}",
                f"{fleet['cpu_us'] - plain['cpu_us']:+.0f}",
            ]
        )
    heads = ["workload", "conc", "plain req/s", "fleet req/s", "throughput", "plain CPU µs/req"]
    print(table([*heads, "fleet CPU µs/req", "added CPU µs/req"], body))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
