"""Helpers shared by tests (importable: `tests/` is on pytest's pythonpath)."""

from __future__ import annotations

import inspect
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx2
import openai

from lmfleet.launch.process import ManagedProcess

T = TypeVar("T")


@dataclass
class SimNode:
    """A running `lmfleet sim` process."""

    url: str
    port: int
    process: ManagedProcess


StartSim = Callable[..., SimNode]

GROUP = {
    "master_address": "127.0.0.1",
    "master_port": 29500,
    "rank_offset": 1,
    "world_size": 2,
    "group_name": "actor",
}
"""An `/init_weights_update_group` body (a trainer at rank 0, one node rank after it)."""
BUCKET = {"names": ["w"], "dtypes": ["bfloat16"], "shapes": [[2, 2]], "group_name": "actor"}
"""An `/update_weights_from_distributed` body for that group."""


def chat(client: openai.OpenAI, model: str, text: str, **params: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **params
    )


def sim_stats(url: str, api_key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx2.get(url + "/sim/stats", headers=headers, timeout=5)
    response.raise_for_status()
    stats: dict[str, Any] = response.json()
    return stats


def sim_served(url: str) -> int:
    """Completed inference requests on one simulated node (from its own counters)."""
    return int(sim_stats(url)["completed"])


async def sims_inflight(urls: Sequence[str], counter: str = "inflight") -> list[int]:
    """Each simulated node's own count of requests in flight ("inflight", queued ones
    included) or of streamed responses past their first chunk ("streaming"), read in a
    worker thread so the event loop driving the requests keeps running."""
    return await anyio.to_thread.run_sync(lambda: [int(sim_stats(u)[counter]) for u in urls])


async def kill_mid_stream(node: SimNode, streams: int = 1, timeout: float = 20.0) -> None:
    """SIGKILL `node` once its own counters show `streams` streamed responses past their
    first chunk (each is cut mid-way: too late for a transparent retry elsewhere), rather
    than after a fixed delay: on a busy machine the load may not have reached the node
    yet, or a client may read well behind it.

    The polls and the kill run in a worker thread: an event loop busy parsing the load's
    chunks would otherwise resume this task only after those streams had ended."""

    def watch_and_kill() -> None:
        with httpx2.Client(base_url=node.url, timeout=5) as http:
            wait_until(
                lambda: int(http.get("/sim/stats").json()["streaming"]),
                timeout,
                f"{streams} stream(s) in flight on {node.url}",
                until=lambda count: count >= streams,
                step=0.002,
            )
            node.process.kill()

    await anyio.to_thread.run_sync(watch_and_kill)


def _describe(probe: Callable[..., object]) -> str:
    """The probe's source line (a lambda names what it waits for), else its name."""
    try:
        source = " ".join(inspect.getsource(probe).split())
    except (OSError, TypeError):
        return getattr(probe, "__qualname__", repr(probe))
    return source if len(source) <= 240 else source[:237] + "..."


def _timed_out(
    what: str | None,
    probe: Callable[..., object],
    until: Callable[..., object],
    timeout: float,
    last: object,
) -> str:
    if what is None:
        what = _describe(probe)
        if until is not bool and _describe(until) != what:
            what += f" until {_describe(until)}"
    return f"timed out after {timeout:g} s waiting for {what}; last observed: {last!r}"


def wait_until(
    probe: Callable[[], T],
    timeout: float = 20.0,
    what: str | None = None,
    *,
    until: Callable[[T], object] = bool,
    step: float = 0.02,
) -> T:
    """Poll `probe` (observable state: stats, fleet status, logs) until `until(value)`
    holds, and return that value; fail naming `what` (default: the probe's source) and
    the last value observed. Never a fixed sleep: the only wait is between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(what, probe, until, timeout, value))
        time.sleep(step)


async def wait_until_async(
    probe: Callable[[], T | Awaitable[T]],
    timeout: float = 20.0,
    what: str | None = None,
    *,
    until: Callable[[T], object] = bool,
    step: float = 0.02,
) -> T:
    """`wait_until` inside an event loop: polls without blocking it. `probe` may return
    an awaitable (e.g. `lambda: sims_inflight(urls)`); blocking probes belong in a thread."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if until(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(what, probe, until, timeout, value))
        await anyio.sleep(step)


GENERATING = ("--ttft-ms", "5", "--tpot-ms", "4", "--output-tokens", "1000")
"""Sim flags for greedy generations slow enough (4 ms a token) to be cut mid-way."""
LOADS_WEIGHTS = ("--backend", "pytorch", "--distributed-executor-backend", "ray")
"""LMDeploy's flags under which a node loads pushed weights (`/update_weights`)."""


def sse_events(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The JSON payloads of an event stream's `data:` lines (`[DONE]` left out)."""
    return [
        json.loads(line[6:])
        for line in lines
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def alive(node: SimNode) -> bool:
    return node.process.returncode is None


def streaming_node(nodes: Sequence[SimNode]) -> SimNode:
    """The live node that is streaming a generation now (its own counter says so)."""
    found = wait_until(
        lambda: [n for n in nodes if alive(n) and sim_stats(n.url)["streaming"]],
        20,
        "a node streaming the generation",
        step=0.005,
    )
    return found[0]


def pinned(base: str, worker: int, timeout: float = 30) -> tuple[httpx2.Client, int]:
    """A kept-alive connection to `lmfleet serve --workers N` that landed on `worker`,
    and that worker's pid. The kernel hands a fresh connection to whichever worker
    accepts first: the same one, many times over, while the other is busy (so: a
    deadline, not a count). Keep it busy: the proxy closes it after 5 s idle."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        client = httpx2.Client(base_url=base, timeout=timeout)
        shared = client.get("/readiness").json()["shared"]
        if shared["worker"] == worker:
            return client, int(shared["pid"])
        client.close()
    raise AssertionError(f"no connection landed on worker {worker}")


def peers_on(proxy: httpx2.Client) -> dict[str, int]:
    """Each node's requests of the proxy's peers (other workers or replicas), as the
    process answering on `proxy`'s connection knows them (`/readiness`)."""
    answer = proxy.get("/readiness").json()
    return {n["url"]: int(n["peers"]) for n in answer["workers"]}


def routes_around_a_peers_stream(
    holder: Callable[[], httpx2.Client],
    other: Callable[[], httpx2.Client],
    nodes: Sequence[SimNode],
    model: str,
) -> None:
    """A generation held open through one process of a proxy (a connection to it
    from `holder`), then one request through another (`other`), a peer that knows
    the generation only as the first process shares it (the nodes' `/metrics` are
    read too rarely in these tests): it must go to the node the generation is not
    on. Four rounds, so that a tie broken in rotation cannot pass by chance; the
    count goes back to 0 after each. Fresh clients each round: a generation left
    before its end closes its connection."""
    urls = [n.url for n in nodes]
    long = {"model": model, "messages": [{"role": "user", "content": "go"}], "stream": True}
    short = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for _ in range(4):
        with closing(holder()) as first, closing(other()) as second:
            with first.stream("POST", "/v1/chat/completions", json=long) as stream:
                assert stream.status_code == 200, stream.read()
                lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
                next(lines)  # its first chunk: it runs on its node
                held = wait_until(
                    lambda: [u for u, n in peers_on(second).items() if n == 1],
                    10,
                    "the held generation in the peer's counts",
                    step=0.005,
                )
                before = {u: sim_served(u) for u in urls}
                answer = second.post("/v1/chat/completions", json=short)
                assert answer.status_code == 200, answer.text
                served = [u for u in urls if sim_served(u) > before[u]]
                assert served and served[0] not in held, (held, served)
            wait_until(
                lambda: not any(peers_on(second).values()),
                10,
                "the peer's count back to 0",
                step=0.005,
            )


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `work` in a daemon thread; its result lands in the list."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(work()), daemon=True)
    thread.start()
    return thread, out
