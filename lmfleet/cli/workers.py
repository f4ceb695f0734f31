"""`lmfleet serve --workers N`: N proxy processes on one port, one proxy to its users.

The supervisor (this process) binds the port once and starts N workers, each a
whole `lmfleet serve` (its own fleet, monitor and routing) that inherits the
listening socket: the kernel hands each new connection to one of them, and the
connections a dead worker had not accepted yet stay queued for the others. The
supervisor runs the hub through which the workers share the fleet's decisions
(lmfleet/proxy/shared.py, lmfleet/proxy/hub.py), restarts a worker that dies (the
new one takes the hub's picture first), and on Ctrl-C or SIGTERM stops them all.
Workers die with it (PR_SET_PDEATHSIG), even when it is SIGKILLed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from lmfleet.cli.cores import usable_cores
from lmfleet.launch.process import die_with_parent

if TYPE_CHECKING:
    from lmfleet.proxy.hub import Hub

log = logging.getLogger("lmfleet.proxy")

QUICK_EXIT = 5.0
"""A worker that exits this soon after its start failed to start."""
QUICK_EXITS = 3
"""That many quick exits in a row and the supervisor gives up (a setting every worker
fails on, not a crash)."""
STOP_GRACE = 20.0
"""Seconds workers get to stop quietly before they are killed."""
WORKER_FLAGS = ("--worker-fd", "--worker-hub", "--worker-index", "--worker-count")


def worker_count(text: str) -> int:
    """`--workers`: a number >= 1, or `auto` (the cores this process may use: its
    affinity, capped by its container's CPU limit: lmfleet/cli/cores.py)."""
    if text == "auto":
        return usable_cores()
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError("--workers must be at least 1")
    return count


def add_arguments(add: argparse._ActionsContainer) -> None:
    add.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        metavar="N|auto",
        help="proxy processes on the one port (default 1; auto: one per core it may use, "
        "within a container's CPU limit), sharing "
        "registrations, sleeps, versions and verdicts (docs/proxy.md, Workers)",
    )
    internal = "(internal: what the supervisor of --workers gives each worker)"
    add.add_argument("--worker-fd", type=int, default=None, help=f"the listening socket {internal}")
    add.add_argument("--worker-hub", type=Path, default=None, help=f"the hub's socket {internal}")
    add.add_argument(
        "--worker-index", type=int, default=0, help=f"this worker's number, default 0 {internal}"
    )
    add.add_argument(
        "--worker-count", type=int, default=1, help=f"how many workers, default 1 {internal}"
    )


def worker_argv(argv: Sequence[str]) -> list[str]:
    """`lmfleet serve`'s own arguments less `--workers` (each worker is one process)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return out


class Worker:
    """One worker process, and what the supervisor remembers of it."""

    def __init__(self, index: int, argv: list[str], fd: int) -> None:
        self.index = index
        self._argv = [*argv, "--worker-index", str(index)]
        self._fd = fd
        self.quick_exits = 0
        self.start()

    def start(self) -> None:
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            self._argv, pass_fds=(self._fd,), stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
        )

    def failed_to_start(self) -> bool:
        """Count the exit just seen: whether it is the `QUICK_EXITS`-th in a row that came
        within `QUICK_EXIT` of its start (a setting every start fails on, not a crash)."""
        quick = time.monotonic() - self.started < QUICK_EXIT
        self.quick_exits = self.quick_exits + 1 if quick else 0
        return self.quick_exits >= QUICK_EXITS


def run(args: argparse.Namespace, serve_argv: Sequence[str]) -> int:
    """Supervise `args.workers` workers until Ctrl-C or SIGTERM; the exit status."""
    from lmfleet.proxy.hub import Hub  # the `[serve]` extra's, as `lmfleet serve` checked
    from lmfleet.proxy.server import _bind

    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="lmfleet-hub-") as folder:
        store = None if args.store is None else (args.store, args.store_name)
        hub = Hub(Path(folder) / "hub.sock", store)
        argv = [
            sys.executable,
            "-m",
            "lmfleet.cli",
            "serve",
            *worker_argv(serve_argv),
            "--worker-fd",
            str(sock.fileno()),
            "--worker-hub",
            str(hub.path),
            "--worker-count",
            str(args.workers),
        ]
        try:
            scheme = "https" if args.ssl else "http"
            return anyio.run(
                _supervise, hub, argv, sock.fileno(), args.workers, scheme, args.host, port
            )
        finally:
            sock.close()


async def _supervise(
    hub: Hub, argv: list[str], fd: int, count: int, scheme: str, host: str, port: int
) -> int:
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        workers = [Worker(i, argv, fd) for i in range(count)]
        status = 0
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            tg.start_soon(_announce, hub, count, f"{scheme}://{_shown(host)}:{port}")
            stop = anyio.Event()

            async def on_signal() -> None:
                async for _ in signals:
                    stop.set()
                    return

            tg.start_soon(on_signal)
            while not stop.is_set():
                for worker in workers:
                    code = worker.process.poll()
                    if code is None:
                        continue
                    if worker.failed_to_start():
                        print(
                            f"lmfleet: error: worker {worker.index} failed to start "
                            f"{QUICK_EXITS} times (exit status {code}); see its error above",
                            file=sys.stderr,
                        )
                        status = 2
                        stop.set()
                        break
                    log.warning(
                        "worker %d (pid %d) exited with status %d: starting another",
                        worker.index,
                        worker.process.pid,
                        code,
                    )
                    worker.start()
                with anyio.move_on_after(0.2):
                    await stop.wait()
        await _stop(workers)
        tg.cancel_scope.cancel()
    return status


def _shown(host: str) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"[{shown}]" if ":" in shown else shown


async def _announce(hub: Hub, count: int, url: str) -> None:
    """One line once every worker is up (joined the hub), as `lmfleet serve` prints."""
    with anyio.move_on_after(120):
        while hub.connected < count:
            await anyio.sleep(0.05)
    print(f"lmfleet proxy on {url} ({count} workers)", file=sys.stderr)


async def _stop(workers: list[Worker]) -> None:
    """SIGTERM every worker (a quiet stop each), SIGKILL what is left after the grace."""
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline and any(w.process.poll() is None for w in workers):
        await anyio.sleep(0.05)
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()
