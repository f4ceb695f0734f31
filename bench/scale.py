"""Scale: one client process, 64 simulator nodes, 2,000 concurrent streams.

The 64 nodes are 8 `bench.multi_sim` processes of 8 nodes each (core 1), cost model
slowed down (`--tpot-ms 250`, 8 output tokens, so a stream lasts about 3 s) so that
2,000 streams are open at once without the nodes saturating 2 cores. The client is
one child process on core 0: `fleet.async_client()` (openai), 2,000 workers in a
closed loop for `--seconds`. Reported: streams completed and failed, client CPU
(% of a core, and per stream), peak RSS, and the fleet's spread over nodes.

    .venv/bin/python -m bench.scale [--seconds 20] [--streams 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
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
)

SIM_FLAGS = ["--tpot-ms", "250", "--output-tokens", "8", "--max-batch", "64"]


def client(urls: list[str], streams: int, seconds: float) -> dict[str, float]:
    import httpx2
    import openai

    from lmfleet import LMFleet

    fleet = LMFleet.attach(urls, health_interval=1.0)
    fleet.wait_ready(timeout=60, min_ready=len(urls))
    aclient = fleet.async_client(max_retries=0, timeout=60)
    done, failed = 0, 0
    peak_inflight = 0

    async def worker(stop: float) -> None:
        nonlocal done, failed
        while time.monotonic() < stop:
            try:
                chunks = await aclient.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "hello"}],
                    max_tokens=8,
                    stream=True,
                )
                async for _ in chunks:
                    pass
                done += 1
            except (openai.APIError, httpx2.HTTPError):  # counted and reported
                failed += 1

    async def watch(stop: float) -> None:
        nonlocal peak_inflight
        while time.monotonic() < stop:
            peak_inflight = max(peak_inflight, sum(n.inflight for n in fleet.nodes))
            await asyncio.sleep(0.5)

    async def main() -> tuple[float, float]:
        stop = time.monotonic() + seconds
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.gather(watch(stop), *(worker(stop) for _ in range(streams)))
        return time.process_time() - cpu0, time.monotonic() - wall0

    cpu, wall = asyncio.run(main())
    served = sorted(n.served for n in fleet.nodes)
    fleet.close()
    return {
        "completed": done,
        "failed": failed,
        "wall_s": wall,
        "cpu_pct": 100 * cpu / wall,
        "cpu_us_per_stream": 1e6 * cpu / max(1, done),
        "peak_inflight": peak_inflight,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "served_min": served[0],
        "served_max": served[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(client(json.loads(args.child), args.streams, args.seconds)))
        return
    pin_self(LOAD_CPU)
    print(f"{machine()}; load average {load_average():.2f}", flush=True)
    with procs() as group:
        urls = []
        pipes = []
        for _ in range(8):
            argv = ["taskset", "-c", LOAD_CPU, PY, "-m", "bench.multi_sim", "--nodes", "8"]
            pipe = subprocess.Popen(
                [*argv, *SIM_FLAGS], stdout=subprocess.PIPE, cwd=ROOT, start_new_session=True
            )
            group.started.append(pipe)  # ended by `procs()` like the others
            pipes.append(pipe)
        for pipe in pipes:
            assert pipe.stdout is not None
            urls += [f"http://127.0.0.1:{p}" for p in pipe.stdout.readline().decode().split()]
        print(f"{len(urls)} nodes up", flush=True)
        argv = ["taskset", "-c", PROXY_CPU, PY, "-m", "bench.scale", "--child", json.dumps(urls)]
        argv += ["--streams", str(args.streams), "--seconds", str(args.seconds)]
        out = subprocess.run(
            argv, capture_output=True, text=True, cwd=ROOT, timeout=args.seconds + 240
        )
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        result = json.loads(out.stdout.strip().splitlines()[-1])
    save_json(args.out, {"machine": machine(), **result})
    for key, value in result.items():
        print(f"  {key:20s} {value:,.1f}" if isinstance(value, float) else f"  {key:20s} {value}")


if __name__ == "__main__":
    main()
