"""`lmfleet serve --workers 2` (lmfleet/cli/workers.py, proxy/shared.py, proxy/hub.py)
as its operators run it: one port, two worker processes, real sims behind them.

A node registered through one connection is used by both workers; a sleep and a
weight update sent to one hold for both (an SGLang node: its own routes cannot say
it sleeps, so only the shared facts can tell the other worker); `/metrics` adds up;
a SIGKILLed worker is replaced while the other keeps serving."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from cli_support import Console
from support import GENERATING, LOADS_WEIGHTS, StartSim, sim_served, sim_stats, wait_until

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


def test_a_generation_cut_by_another_workers_update_continues(
    console: Callable[..., Console], start_sim: StartSim
) -> None:
    nodes = [start_sim(*GENERATING, *LOADS_WEIGHTS) for _ in range(2)]
    proxy, base = _start(console, "--node", nodes[0].url, "--node", nodes[1].url)
    wait_until(
        lambda: all(
            n["state"] == "healthy"
            for a in _each_workers_readiness(base).values()
            for n in a["workers"]
        ),
        20,
        "both nodes healthy on both workers",
    )
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
    for _ in range(50):
        client = httpx2.Client(base_url=base, timeout=10)
        if client.get("/readiness").json()["shared"]["worker"] == 1:
            break
        client.close()
    else:
        pytest.fail("no connection landed on worker 1")
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
