"""CPU cost of the health monitor: one fleet polling N nodes every second.

The nodes are N listening ports served by one child process (a minimal asyncio
HTTP responder answering `/health` like LMDeploy), so the figure is the cost in
the fleet's process alone: `process_time()` over a window, as % of one core.

    .venv/bin/python bench/monitor_cpu.py --nodes 64 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

from lmfleet import LMFleet

BODY = b'{"status": "healthy", "message": ""}'
MODELS = b'{"object": "list", "data": [{"id": "m", "object": "model"}]}'


async def _respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = MODELS if b"/v1/models" in head.split(b"\r\n", 1)[0] else BODY
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _serve(count: int) -> None:
    """Listen on `count` ports the kernel picks; print them on one line for the parent."""
    servers = [await asyncio.start_server(_respond, "127.0.0.1", 0) for _ in range(count)]
    print(" ".join(str(s.sockets[0].getsockname()[1]) for s in servers), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return

    argv = [sys.executable, __file__, "--serve", str(args.nodes)]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        ports = [int(p) for p in child.stdout.readline().split()]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        with LMFleet.attach(urls, health_interval=args.interval) as fleet:
            fleet.wait_ready(timeout=30, min_ready=args.nodes)
            time.sleep(2 * args.interval)  # settle: every node probed at least once
            cpu0, wall0 = time.process_time(), time.monotonic()
            time.sleep(args.seconds)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        probes = args.nodes * wall / (args.interval * 1.05)  # mean jitter is 5 %
        print(f"nodes={args.nodes} interval={args.interval}s window={wall:.1f}s")
        print(f"fleet process CPU: {100 * cpu / wall:.2f}% of one core")
        print(f"about {1e6 * cpu / probes:.0f} us CPU per probe ({probes:.0f} probes)")
        print(f"pid {os.getpid()} python {sys.version.split()[0]}")
    finally:
        child.terminate()
        child.wait(timeout=10)


if __name__ == "__main__":
    main()
