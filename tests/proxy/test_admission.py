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


def test_callers_who_disconnect_leave_the_queue_at_once(
    serve_fleet: Callable[..., Served], start_sim: StartSim
) -> None:
    """Three callers give up while they wait (a client timeout, no header saying so):
    within a second nothing of them is left in the queue or the in-flight gauge, and a
    fourth request gets a place in the queue of three instead of 'queue full'."""
    url = start_sim(*FAST).url
    fleet, server = serve_fleet([url], admission_queue=3, wait_for_node=60)
    fleet.sleep()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "gone soon"}]}

    def give_up() -> str:
        with pytest.raises(httpx2.ReadTimeout):
            httpx2.post(server.url + "/v1/chat/completions", json=body, timeout=1.0)
        return "gave up"

    with ThreadPoolExecutor(3) as pool:
        ghosts = [pool.submit(give_up) for _ in range(3)]
        wait_until(lambda: fleet.registry.waiting, timeout=10, until=lambda n: n == 3)
        assert [g.result(timeout=10) for g in ghosts] == ["gave up"] * 3
    gone = time.monotonic()
    wait_until(lambda: fleet.registry.waiting, timeout=5, until=lambda n: n == 0)
    wait_until(
        lambda: metric(server, "lmfleet_proxy_inflight"),
        timeout=5,
        until=lambda line: line == "lmfleet_proxy_inflight 0.0",
    )
    assert time.monotonic() - gone < 1.0
    assert metric(server, "lmfleet_requests_waiting") == "lmfleet_requests_waiting 0.0"

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with ThreadPoolExecutor(1) as pool:
        fourth = pool.submit(chat, client, MODEL, "still here", max_tokens=2)
        wait_until(lambda: fleet.registry.waiting, timeout=10, until=lambda n: n == 1)
        fleet.wakeup()
        assert fourth.result(timeout=30).choices[0].message.content
    assert fleet.registry.waiting == 0


@pytest.mark.parametrize("header", ["x-lmfleet-timeout", "x-stainless-read-timeout"])
def test_the_callers_timeout_header_bounds_its_wait(
    serve_fleet: Callable[..., Served], start_sim: StartSim, header: str
) -> None:
    """The caller says it waits 1 s (lmfleet's header, or the one openai's SDKs send):
    the proxy answers 503 after about 1 s instead of waiting wait_for_node (60 s)."""
    url = start_sim(*FAST).url
    fleet, server = serve_fleet([url], wait_for_node=60)
    fleet.sleep()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "in a hurry"}]}
    started = time.monotonic()
    answer = httpx2.post(
        server.url + "/v1/chat/completions", json=body, headers={header: "1"}, timeout=30
    )
    assert time.monotonic() - started < 5.0
    assert answer.status_code == 503 and "retry-after" in answer.headers
    assert "the caller's timeout" in answer.json()["message"]
    assert fleet.registry.waiting == 0


def test_an_impossible_version_ask_fails_at_once(
    serve_fleet: Callable[..., Served], two_nodes: list[str]
) -> None:
    """No node is at version 99 and no update brings it: a 503 naming why, at once."""
    fleet, server = serve_fleet(two_nodes, wait_for_node=60)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "from the future"}]}
    started = time.monotonic()
    answer = httpx2.post(
        server.url + "/v1/chat/completions",
        json=body,
        headers={"x-lmfleet-weight-version": "99"},
        timeout=30,
    )
    elapsed = time.monotonic() - started
    assert answer.status_code == 503, answer.text
    message = answer.json()["message"]
    assert "no node is at weight version 99 (they are at 0)" in message, message
    assert "no weight update is bringing it" in message
    assert elapsed < 1.0  # the test's own request overhead included; the refusal is at once
    assert fleet.registry.waiting == 0


def test_a_caller_who_gives_up_on_a_working_node_frees_its_slot(
    serve_fleet: Callable[..., Served], start_sim: StartSim
) -> None:
    """The node has the request and sends nothing yet; the caller disconnects: the
    node's in-flight count and the proxy's gauge drop back, with no mark against it."""
    url = start_sim(*FAST, "--hang").url
    fleet, server = serve_fleet([url], first_byte_timeout=60)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "never answered"}]}
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(server.url + "/v1/chat/completions", json=body, timeout=1.0)
    wait_until(lambda: fleet.registry.get(url).inflight, timeout=5, until=lambda n: n == 0)
    assert metric(server, "lmfleet_proxy_inflight") == "lmfleet_proxy_inflight 0.0"
    node = fleet.registry.get(url)
    assert (node.errors, node.status.value) == (0, "healthy")
