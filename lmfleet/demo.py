"""`lmfleet demo`: the main job on the embedded default, with no GPU.

Starts simulated LMDeploy nodes (one of them 3x slower), routes a batch of chat
requests over them through a real `openai.AsyncOpenAI`, serves the same routing
as an HTTP proxy and sends a batch through it with a plain `openai.OpenAI`, then
puts a node to sleep and shows the traffic moving, and finally turns a node into a
black hole (every answer a 500, `/health` still green) and shows it ejected while
every request still succeeds, printing what went where.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import httpx2

from lmfleet.plain_errors import require_serve
from lmfleet.routing import DEFAULT_STRATEGY

if TYPE_CHECKING:  # the fleet and openai are imported by the demo's run, not by the
    # parser every `lmfleet` command builds (`lmfleet sim` starts without them)
    from openai.types.chat import ChatCompletionMessageParam

    from lmfleet.fleet import LMFleet
    from lmfleet.node.views import FleetStatus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=3, help="simulated nodes (default 3)")
    parser.add_argument("--requests", type=int, default=120, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--strategy", default=DEFAULT_STRATEGY)


class _Stopped(Exception):
    """Ctrl-C or SIGTERM arrived: the demo winds down at the end of its current burst."""


async def _burst(
    fleet: LMFleet,
    requests: int,
    concurrency: int,
    base_url: str | None = None,
    stop: threading.Event | None = None,
) -> tuple[int, float]:
    """Send `requests` chat completions (every other one streamed); return (ok, seconds).

    Routed in-process by default; with `base_url`, through the proxy at that URL.
    Once `stop` is set no new request starts, and `_Stopped` ends the demo.
    """
    import openai

    client = (
        fleet.async_client(max_retries=0)  # the router alone fails over
        if base_url is None
        else openai.AsyncOpenAI(
            base_url=base_url,
            api_key="none",
            max_retries=0,
            # The proxy is on 127.0.0.1: not through an `http_proxy` the shell may set.
            http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
        )
    )
    limiter = anyio.Semaphore(concurrency)
    ok = 0

    async def one(i: int) -> None:
        nonlocal ok
        async with limiter:
            if stop is not None and stop.is_set():
                return
            messages: list[ChatCompletionMessageParam] = [
                {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}
            ]
            if i % 2:
                stream = await client.chat.completions.create(
                    model=fleet.model, messages=messages, max_tokens=16, stream=True
                )
                async for _ in stream:
                    pass
            else:
                await client.chat.completions.create(
                    model=fleet.model, messages=messages, max_tokens=16
                )
            ok += 1

    started = time.perf_counter()
    async with client, anyio.create_task_group() as tg:
        for i in range(requests):
            tg.start_soon(one, i)
    if stop is not None and stop.is_set():
        raise _Stopped
    return ok, time.perf_counter() - started


def _served(status: FleetStatus) -> Counter[str]:
    return Counter({n.url: n.served for n in status.nodes})


def _failed(status: FleetStatus) -> Counter[str]:
    return Counter({n.url: n.errors for n in status.nodes})


def _report(
    title: str, before: Counter[str], after: FleetStatus, failed: Counter[str] | None = None
) -> None:
    print(f"\n{title}")
    for node in after.nodes:
        got = node.served - before[node.url]
        line = f"  {node.url:<24} {node.state.value:<9} +{got:<4} requests  {'#' * (got // 2)}"
        if failed is not None and node.errors > failed[node.url]:
            line += (
                f"  ({node.errors - failed[node.url]} answered 500, failed over; {node.message})"
            )
        print(line)


STOP_GRACE = 10.0
"""Seconds the demo gets to wind down after Ctrl-C before its fleet is closed under it."""


def run(args: argparse.Namespace) -> int:
    """The demo in a worker thread, so that Ctrl-C or SIGTERM end it quietly.

    A KeyboardInterrupt raised at an arbitrary point of an event loop's set-up
    leaves "Exception ignored" noise behind; instead a signal sets `stop`, the
    demo's current burst starts no new request and the demo leaves its `with`
    block (closing the fleet and its nodes). Should it not within a few seconds
    (a phase that waits), the main thread closes the fleet itself.
    """
    require_serve("lmfleet demo")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    fleets: list[LMFleet] = []
    failures: list[BaseException] = []

    def work() -> None:
        try:
            _demo(args, fleets.append, stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            if not stop.is_set():
                failures.append(exc)
        finally:
            stop.set()

    worker = threading.Thread(target=work, name="lmfleet demo", daemon=True)
    worker.start()
    while not stop.wait(0.5):
        pass
    worker.join(timeout=STOP_GRACE)
    if worker.is_alive():  # still busy: close what runs; atexit closes a fleet still starting
        for fleet in fleets:
            fleet.close()
        return 0
    if failures:
        raise failures[0]
    return 0


def _demo(
    args: argparse.Namespace, started: Callable[[LMFleet], None], stop: threading.Event
) -> None:
    from lmfleet.fleet import LMFleet

    nodes = max(2, args.nodes)
    speeds = [1.0] * (nodes - 1) + [1 / 3]
    print(f"Starting {nodes} simulated LMDeploy nodes (the last one 3x slower)...")
    with LMFleet.simulate(
        nodes, speed=speeds, strategy=args.strategy, health_interval=0.5
    ) as fleet:
        started(fleet)
        fleet.wait_ready(timeout=60)
        print(fleet)

        before = _served(fleet.status())
        ok, took = anyio.run(_burst, fleet, args.requests, args.concurrency, None, stop)
        _report(
            f"{ok}/{args.requests} requests in {took:.1f} s with {args.strategy} "
            "(the slow node gets less):",
            before,
            fleet.status(),
        )

        server = fleet.serve(port=0)
        print(f"\nServing the same routing as an HTTP proxy at {server.url} (fleet.serve())")
        before = _served(fleet.status())
        ok, took = anyio.run(
            _burst, fleet, args.requests // 2, args.concurrency, server.url + "/v1", stop
        )
        _report(
            f"{ok}/{args.requests // 2} requests through the proxy in {took:.1f} s "
            "(a plain openai.AsyncOpenAI pointed at it):",
            before,
            fleet.status(),
        )

        sleeper = fleet.nodes[0].url
        print(f"\nPutting {sleeper} to sleep (drained first, then POST /sleep)...")
        fleet.sleep(level=1, nodes=[sleeper])
        before = _served(fleet.status())
        ok, took = anyio.run(_burst, fleet, args.requests // 2, args.concurrency, None, stop)
        _report(f"{ok}/{args.requests // 2} requests while it sleeps:", before, fleet.status())

        fleet.wakeup(nodes=[sleeper])
        before = _served(fleet.status())
        ok, took = anyio.run(_burst, fleet, args.requests // 2, args.concurrency, None, stop)
        _report(f"{ok}/{args.requests // 2} requests after wakeup:", before, fleet.status())

        hole = fleet.nodes[1].url
        print(f"\n{hole} now answers every generation with HTTP 500; its /health stays green.")
        faults = {"error_rate": 1.0, "error_status": 500}
        httpx2.post(
            hole + "/sim/faults", json=faults, timeout=10, trust_env=False
        ).raise_for_status()
        before, failed = _served(fleet.status()), _failed(fleet.status())
        ok, took = anyio.run(_burst, fleet, args.requests // 2, args.concurrency, None, stop)
        _report(
            f"{ok}/{args.requests // 2} requests succeed anyway (each 500 is sent to another "
            "node before any byte reaches the caller; the node is ejected):",
            before,
            fleet.status(),
            failed,
        )
        print()
        print(fleet)
        server.stop()
    print("\nProxy and all nodes stopped.")
