"""`lmfleet serve --workers 2` (lmfleet/cli/workers.py, proxy/shared.py, proxy/hub.py)
as its operators run it: one port, two worker processes, real sims behind them.

A node registered through one connection is used by both workers; a sleep and a
weight update sent to one hold for both (an SGLang node: its own routes cannot say
it sleeps, so only the shared facts can tell the other worker); each worker routes
around the others' requests as they share them; `/metrics` adds up;
a SIGKILLed worker is replaced while the other keeps serving."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx2
import openai
import pytest
from cli_support import Console
from support import (
    GENERATING,
    LOADS_WEIGHTS,
    StartSim,
    peers_on,
    pinned,
    routes_around_a_peers_stream,
    sim_served,
    sim_stats,
    wait_until,
)

from lmfleet.proxy.shared import HELD_FOR

MODEL = "internlm/internlm2_5-7b-chat"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CLOSE = {"connection": "close"}  # a fresh connection per request: the kernel picks a worker

pytestmark = pytest.mark.xdist_group("workers")


def _start(console: Callable[..., Console], *flags: str) -> tuple[Console, str]:
    proxy = console("serve", "--workers", "2", "--port", "0", "--disable-cache-status", *flags)
    found = proxy.wait_for(r"lmfleet proxy on (http://127\.0\.0\.1:\d+) \(2 workers\)")
    return proxy, found.group(1)


def _metric(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _each_workers_readiness(base: str) -> dict[int, dict[str, Any]]:
    """`/readiness` as each worker answers it (fresh connections until both did)."""
    seen: dict[int, dict[str, Any]] = {}

    def both() -> bool:
        answer = httpx2.get(base + "/readiness", headers=CLOSE, timeout=10).json()
        seen[answer["shared"]["worker"]] = answer
        return len(seen) == 2

    wait_until(both, 20, "both workers answering /readiness", step=0.01)
    return seen


def _wait_all_healthy(base: str) -> None:
    wait_until(
        lambda: all(
            n["state"] == "healthy"
            for a in _each_workers_readiness(base).values()
            for n in a["workers"]
        ),
        20,
        "every node healthy on both workers",
    )


def _node(answer: dict[str, Any], url: str) -> dict[str, Any]:
    return next(n for n in answer["workers"] if n["url"] == url)


def test_two_workers_share_the_fleet_and_add_up_their_metrics(
    console: Callable[..., Console], start_sim: StartSim
) -> None:
    lmdeploy = start_sim("--fast")
    sglang = start_sim("--engine", "sglang", "--fast")
    proxy, base = _start(console)
    for node in (lmdeploy, sglang):  # registered through one connection each
        added = httpx2.post(base + "/nodes/add", json={"url": node.url}, timeout=10)
        assert added.status_code == 200, added.text
    wait_until(
        lambda: all(
            _node(a, n.url)["state"] == "healthy"
            for a in _each_workers_readiness(base).values()
            for n in (lmdeploy, sglang)
        ),
        20,
        "both nodes healthy on both workers",
    )

    sent = 0

    def by_worker() -> list[float]:
        text = httpx2.get(base + "/metrics", timeout=10).text
        return [
            _metric(text, "lmfleet_proxy_worker_requests_total", f'{{worker="{w}"}}') for w in "01"
        ]

    def both_served() -> bool:
        nonlocal sent
        for _ in range(8):
            answer = httpx2.post(
                base + "/v1/chat/completions", json=CHAT, headers=CLOSE, timeout=10
            )
            assert answer.status_code == 200, answer.text
            sent += 1
        return all(count > 0 for count in by_worker())

    wait_until(both_served, 60, "requests answered by both workers")
    assert sim_served(lmdeploy.url) + sim_served(sglang.url) == sent  # each one reached a node
    text = httpx2.get(base + "/metrics", timeout=10).text
    assert _metric(text, "lmfleet_proxy_workers") == 2
    chats = _metric(text, "lmfleet_proxy_requests_total", '{route="/v1/chat/completions"}')
    assert chats == sent  # one view: both workers' requests added up

    slept = httpx2.post(base + "/fleet/sleep", params={"node": sglang.url}, timeout=30)
    assert slept.status_code == 200, slept.text
    update = {"version": 2, "payload": "same", "nodes": [sglang.url]}
    updated = httpx2.post(base + "/fleet/update_weights", json=update, timeout=60)
    assert updated.status_code == 200, updated.text
    for worker, answer in _each_workers_readiness(base).items():
        node = _node(answer, sglang.url)
        # The update woke it again; slept before, on the worker that received neither.
        assert node["weight_version"] == 2, (worker, node)
    slept = httpx2.post(base + "/fleet/sleep", params={"node": sglang.url}, timeout=30)
    assert slept.status_code == 200, slept.text
    for worker, answer in _each_workers_readiness(base).items():
        assert _node(answer, sglang.url)["state"] == "sleeping", (worker, answer)
    assert proxy.stop(signal.SIGINT) == 0


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


def test_a_killed_worker_is_replaced_and_costs_only_what_it_held(
    console: Callable[..., Console], start_sim: StartSim
) -> None:
    node = start_sim("--ttft-ms", "5", "--tpot-ms", "5")
    proxy, base = _start(console, "--node", node.url)
    workers = _children(proxy.proc.pid)
    assert len(workers) == 2
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                answer = httpx2.post(
                    base + "/v1/chat/completions", json=CHAT, headers=CLOSE, timeout=10
                )
                results.append(answer.status_code)
            except httpx2.TransportError:
                results.append(0)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(results) >= 20, 30, "load flowing")
    os.kill(workers[0], signal.SIGKILL)
    proxy.wait_for(r"worker \d \(pid \d+\) exited with status -9: starting another")
    wait_until(lambda: len(_children(proxy.proc.pid)) == 2, 30, "a new worker")
    replaced = len(results)
    wait_until(
        lambda: (
            _metric(httpx2.get(base + "/metrics", timeout=10).text, "lmfleet_proxy_workers") == 2
        ),
        30,
        "the new worker answering scrapes",
    )
    wait_until(lambda: len(results) >= replaced + 20, 30, "load flowing after")
    stop.set()
    for thread in threads:
        thread.join(15)
    failed = [status for status in results if status != 200]
    assert len(failed) <= 3, failed  # at most the one request per caller the dead worker held
    assert proxy.stop(signal.SIGTERM) == 0
    assert not [pid for pid in workers[1:] if os.path.exists(f"/proc/{pid}")]


def test_each_worker_counts_the_others_requests_on_every_node(
    console: Callable[..., Console], start_sim: StartSim
) -> None:
    nodes = [start_sim(*GENERATING) for _ in range(2)]
    # Given speeds: the cost of a request is the same on both, whatever latencies
    # were measured; the 30 s interval keeps the nodes' own reports out of it.
    flags = [f for n in nodes for f in ("--node", f"{n.url},speed=1,health-interval=30")]
    proxy, base = _start(console, *flags)
    _wait_all_healthy(base)

    def on(worker: int) -> Callable[[], httpx2.Client]:
        return lambda: pinned(base, worker)[0]

    routes_around_a_peers_stream(on(0), on(1), nodes, MODEL)

    # A worker killed with a generation running: the other drops its counts at once
    # (the hub saw its line close), before they could expire unheard (HELD_FOR).
    holder, pid = pinned(base, 0)
    survivor, _ = pinned(base, 1)
    long = {**CHAT, "max_tokens": 1000, "stream": True}
    with holder.stream("POST", "/v1/chat/completions", json=long) as stream:
        lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)
        wait_until(lambda: sum(peers_on(survivor).values()) == 1, 10, "the stream shared")
        os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: sum(peers_on(survivor).values()) == 0,
        HELD_FOR - 1,
        "the dead worker's count gone before it could expire",
    )
    holder.close()
    survivor.close()
    assert proxy.stop(signal.SIGINT) == 0


def test_one_metrics_read_a_round_serves_both_workers(
    console: Callable[..., Console], start_sim: StartSim
) -> None:
    nodes = [start_sim("--fast") for _ in range(2)]
    interval = 0.5
    flags = [f for n in nodes for f in ("--node", n.url)]
    proxy, base = _start(console, *flags, "--health-interval", str(interval))
    _wait_all_healthy(base)
    # Each node is read by one worker, not all by worker 0: the shares split the nodes.
    shares = [set(a["shared"]["reads_metrics"]) for a in _each_workers_readiness(base).values()]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == {n.url for n in nodes}

    def knows_both_loads(client: httpx2.Client) -> bool:
        return all(n["queue_current"] for n in client.get("/nodes/status").json().values())

    for worker in (0, 1):  # each knows each node's load as current, whoever read it
        client, _ = pinned(base, worker)
        try:
            wait_until(partial(knows_both_loads, client), 10, f"worker {worker} knowing the loads")
        finally:
            client.close()

    def reads() -> list[int]:
        return [sim_stats(n.url)["by_path"].get("/metrics", 0) for n in nodes]

    before, started = reads(), time.monotonic()
    wait_until(
        lambda: min(now - then for now, then in zip(reads(), before, strict=True)) >= 8,
        30,
        "8 more reads of each node's /metrics",
    )
    elapsed = time.monotonic() - started
    # Each worker reading for itself makes 8 reads in ~4 rounds (~2.1 s); worker 0
    # reading for both, 8 rounds or more (a busy machine only makes it slower).
    assert elapsed >= 0.75 * 8 * interval, (elapsed, before, reads())
    assert proxy.stop(signal.SIGINT) == 0


def test_a_generation_cut_by_another_workers_update_continues(
    console: Callable[..., Console], start_sim: StartSim
) -> None:
    nodes = [start_sim(*GENERATING, *LOADS_WEIGHTS) for _ in range(2)]
    proxy, base = _start(console, "--node", nodes[0].url, "--node", nodes[1].url)
    _wait_all_healthy(base)
    body = {"input_ids": [11, 12, 13, 14, 15], "max_tokens": 250, "ignore_eos": True}
    answers: list[dict[str, Any]] = []

    def generate() -> None:  # each on its own connection: spread over both workers
        answer = httpx2.post(base + "/generate", json=body, headers=CLOSE, timeout=60)
        answers.append(answer.json())

    threads = [threading.Thread(target=generate, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    wait_until(
        lambda: sum(sim_stats(n.url)["streaming"] for n in nodes) == 6, 20, "6 generations running"
    )
    update = {"version": 1, "payload": "same", "in_flight": "continue"}
    updated = httpx2.post(base + "/fleet/update_weights", json=update, headers=CLOSE, timeout=60)
    assert updated.status_code == 200, updated.text
    for thread in threads:
        thread.join(60)
    for answer in answers:  # whichever worker followed it, none was lost to the cut
        assert len(answer["output_ids"]) == 250, answer["meta_info"]
        assert answer["meta_info"]["finish_reason"] == {"type": "length"}
        assert [s[2] for s in answer["meta_info"]["weight_versions"]] == [0, 1]
    assert proxy.stop(signal.SIGINT) == 0


def test_one_auto_sleeper_hears_every_workers_traffic(
    console: Callable[..., Console], start_sim: StartSim
) -> None:
    node = start_sim("--fast")
    flags = ("--node", node.url, "--auto-sleep-after", "1.5", "--health-interval", "0.2")
    proxy, base = _start(console, *flags)
    # Under load the workers can take longer than --auto-sleep-after to start, so the
    # node may already be asleep here: known to both is what the test needs.
    wait_until(
        lambda: all(
            _node(a, node.url)["state"] in ("healthy", "sleeping")
            for a in _each_workers_readiness(base).values()
        ),
        20,
        "the node known to both workers",
    )
    # One kept-alive connection to worker 1, which does not auto-sleep: worker 0 sees
    # none of this traffic itself, only through the shared facts.
    client, _ = pinned(base, 1, timeout=10)
    try:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # awake now
        slept = sim_stats(node.url)["by_path"].get("/sleep", 0)
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:  # busy for 2.7 x --auto-sleep-after
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert sim_stats(node.url)["by_path"].get("/sleep", 0) == slept, "slept while busy"
        wait_until(
            lambda: sim_stats(node.url)["by_path"].get("/sleep", 0) > slept,
            20,
            "the idle node asleep",
        )
        answer = client.post("/v1/chat/completions", json=CHAT)  # woken on demand by worker 1
        assert answer.status_code == 200, answer.text
    finally:
        client.close()
    assert proxy.stop(signal.SIGINT) == 0


SLOW = {**CHAT, "max_tokens": 10}  # 0.4 s a line on the sims below


def _batch_lines(count: int) -> bytes:
    rows = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": SLOW}
        for i in range(count)
    ]
    return "\n".join(json.dumps(row) for row in rows).encode()


def test_a_batch_is_one_job_for_every_worker_and_outlives_the_one_that_ran_it(
    console: Callable[..., Console], start_sim: StartSim
) -> None:
    nodes = [start_sim("--ttft-ms", "5", "--tpot-ms", "40") for _ in range(2)]
    flags = ("--node", nodes[0].url, "--node", nodes[1].url, "--batch-concurrency", "2")
    proxy, base = _start(console, *flags)  # --disable-cache-status: a temporary jobs dir
    (http0, pid0), (http1, _) = pinned(base, 0), pinned(base, 1)
    zero = openai.OpenAI(base_url=base + "/v1", api_key="x", http_client=http0, max_retries=0)
    one = openai.OpenAI(base_url=base + "/v1", api_key="x", http_client=http1, max_retries=0)

    def seen_by_one(batch_id: str, what: str, until: Callable[[Any], bool]) -> Any:
        return wait_until(lambda: one.batches.retrieve(batch_id), 30, what, until=until)

    # Uploaded and started through worker 0; followed, cancelled and read through 1.
    uploaded = zero.files.create(file=("a.jsonl", _batch_lines(40)), purpose="batch")
    batch = zero.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    seen_by_one(
        batch.id, "counts from the worker running it", lambda b: b.request_counts.completed >= 2
    )
    assert one.batches.cancel(batch.id).status == "cancelling"
    cancelled = seen_by_one(batch.id, "the batch cancelled", lambda b: b.status == "cancelled")
    assert zero.batches.retrieve(batch.id).status == "cancelled"
    done = [json.loads(r) for r in one.files.content(cancelled.output_file_id).text.splitlines()]
    assert 2 <= len(done) < 40

    # Its worker SIGKILLed half-way: another takes it over from its journal.
    served = sum(sim_served(n.url) for n in nodes)
    uploaded = one.files.create(file=("b.jsonl", _batch_lines(16)), purpose="batch")
    batch = zero.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    seen_by_one(batch.id, "3 lines done", lambda b: b.request_counts.completed >= 3)
    os.kill(pid0, signal.SIGKILL)
    finished = seen_by_one(batch.id, "the batch completed", lambda b: b.status == "completed")
    rows = [json.loads(r) for r in one.files.content(finished.output_file_id).text.splitlines()]
    assert sorted(int(r["custom_id"][1:]) for r in rows) == list(range(16))
    assert finished.request_counts.completed == 16 and finished.error_file_id is None
    # Only the lines in flight when the worker died were asked again (2 at a time).
    assert sum(sim_served(n.url) for n in nodes) - served <= 16 + 2
    http0.close()
    http1.close()
    assert proxy.stop(signal.SIGINT) == 0
