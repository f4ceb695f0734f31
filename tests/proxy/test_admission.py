"""A full admission queue through `fleet.serve()`: 503 with `Retry-After` at once, an
OpenAI-shaped body, and the queue's length in /metrics. Real sims, real uvicorn."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest
from support import StartSim, chat, wait_until

from lmfleet import LMFleet
from lmfleet.proxy import ProxyServer

Served = tuple[LMFleet, ProxyServer]
FAST = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")
MODEL = "internlm/internlm2_5-7b-chat"


def metric(server: ProxyServer, name: str) -> str:
    text = httpx2.get(server.url + "/metrics", timeout=10).text
    return next(line for line in text.splitlines() if line.startswith(name + " "))


def test_full_admission_queue_is_a_503_with_retry_after(
    serve_fleet: Callable[..., Served], start_sim: StartSim
) -> None:
    url = start_sim(*FAST).url
    fleet, server = serve_fleet([url], admission_queue=2, wait_for_node=30)
    fleet.sleep()  # and no wake on demand: requests wait
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with ThreadPoolExecutor(2) as pool:
        waiters = [pool.submit(chat, client, MODEL, f"wait {i}", max_tokens=2) for i in (1, 2)]
        wait_until(lambda: fleet.registry.waiting, timeout=10, until=lambda n: n == 2)
        assert metric(server, "lmfleet_requests_waiting") == "lmfleet_requests_waiting 2.0"

        started = time.monotonic()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "one too many"}]}
        refused = httpx2.post(server.url + "/v1/chat/completions", json=body, timeout=10)
        assert time.monotonic() - started < 1.0
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "x-should-retry" not in refused.headers  # a retry later is welcome
        error = refused.json()
        assert error["object"] == "error" and error["type"] == "service_unavailable"
        assert error["code"] == 503 and "admission queue is full" in error["message"]
        assert "routing.admission_queue=2" in error["message"]
        with pytest.raises(openai.APIStatusError) as caught:
            chat(client, MODEL, "one too many", max_tokens=2)
        assert caught.value.status_code == 503

        fleet.wakeup()
        assert all(w.result(timeout=30).choices[0].message.content for w in waiters)
    assert fleet.registry.waiting == 0
    assert metric(server, "lmfleet_requests_waiting") == "lmfleet_requests_waiting 0.0"
    busy = 'lmfleet_proxy_errors_total{kind="fleet_busy"}'
    assert metric(server, busy) == busy + " 2.0"
