"""Bench-only: many emulated nodes in one process, one uvicorn server per port.

One sim process per node is too heavy for 64 nodes on 2 cores; this serves N
independent `SimApp`s (each its own engine, queue and stats) from one event loop.
Prints the ports on one line once every server accepts connections.

    .venv/bin/python -m bench.multi_sim --nodes 8 [sim flags: --tpot-ms 200 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket

import uvicorn

from lmfleet.sim.app import create_app
from lmfleet.sim.cli import add_arguments, options_from_args


async def serve(args: argparse.Namespace, count: int) -> None:
    servers, socks = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        args.port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(options_from_args(args)),
            lifespan="on",
            access_log=False,
            log_level="error",
            http="httptools",
            timeout_graceful_shutdown=1,
        )
        servers.append(uvicorn.Server(config))
        socks.append(sock)
    tasks = [asyncio.create_task(s.serve(sockets=[k])) for s, k in zip(servers, socks, strict=True)]
    while not all(s.started for s in servers):
        await asyncio.sleep(0.05)
    # uvicorn's handler stops one server only; the nodes keep no state: exit at once.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print(" ".join(str(k.getsockname()[1]) for k in socks), flush=True)
    await asyncio.gather(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=8)
    add_arguments(parser)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args, args.nodes))


if __name__ == "__main__":
    main()
