"""The front door's fast lane (lmfleet/proxy/fast_lane.py), over real sims and uvicorn.

The rest of the proxy's tests send mostly plain requests, so they run through the
lane too; these show which requests take it (its counter in `/metrics`), that what
it answers carries what the pipeline's answers carry, that a first attempt failing
there is failed over by the pipeline by the plan's rules, and that a caller who
leaves frees the node.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx2
import openai
import pytest
from support import StartSim, chat, sim_stats, wait_until

from lmfleet import FleetOptions, LMFleet, RoutingOptions
from lmfleet.proxy import ProxyOptions, ProxyServer

Served = tuple[LMFleet, ProxyServer]
FAST = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")
MODEL = "internlm/internlm2_5-7b-chat"


def lane(server: ProxyServer, outcome: str) -> int:
    """`lmfleet_proxy_fast_lane_total{outcome=...}` in the proxy's `/metrics` (0: none)."""
    prefix = f'lmfleet_proxy_fast_lane_total{{outcome="{outcome}"}} '
    for line in httpx2.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(prefix):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def test_plain_requests_take_the_lane_and_others_the_pipeline(
    serve_fleet: Callable[..., Served], two_nodes: list[str]
) -> None:
    fleet, server = serve_fleet(two_nodes)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-lmfleet-weight-version"] == "0"
    assert raw.headers["x-lmfleet-request-id"]
    chosen = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        extra_headers={"x-lmfleet-request-id": "mine-7"},
    )
    assert chosen.headers["x-lmfleet-request-id"] == "mine-7"
    chunks = list(chat(client, MODEL, "stream me", max_tokens=8, stream=True))
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=3).choices[0].text
    assert lane(server, "answered") == 4

    # Asks of routing, and answers of the table, go the pipeline's way.
    asks = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        extra_headers={"x-lmfleet-priority": "1"},
        extra_body={"weight_version": 0},
    )
    assert asks.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        chat(client, "no-such-model", "hi", max_tokens=3)
    bad = httpx2.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert bad.status_code == 400 and json.loads(bad.text)["object"] == "error"
    assert lane(server, "answered") == 4

    # Off (`--no-fast-lane`): every request through the pipeline, answered the same.
    off = fleet.serve(port=0, options=ProxyOptions(fast_lane=False))
    try:
        other = openai.OpenAI(base_url=off.url + "/v1", api_key="unused", max_retries=0)
        assert chat(other, MODEL, "hi", max_tokens=3).choices[0].message.content
        assert lane(off, "answered") == 0
    finally:
        off.stop()


def test_a_first_attempt_that_fails_is_failed_over_by_the_plan(
    serve_fleet: Callable[..., Served], start_sim: StartSim, caplog: pytest.LogCaptureFixture
) -> None:
    good = start_sim(*FAST)
    failing = start_sim(*FAST, "--error-rate", "1", "--error-status", "503")
    _, server = serve_fleet([good.url, failing.url], strategy="round_robin")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with caplog.at_level("WARNING", logger="lmfleet"):
        for i in range(4):  # round robin: the failing node gets a first attempt early
            assert chat(client, MODEL, f"hi {i}", max_tokens=2).choices[0].message.content
            if lane(server, "failed_over"):
                break
    assert lane(server, "failed_over") == 1
    # The plan judged the lane's attempt by its own rules: a 503 opens the circuit.
    assert f"{failing.url} healthy -> unhealthy: answered HTTP 503" in caplog.text
    assert sim_stats(failing.url)["errors_injected"] == 1
    status = httpx2.get(server.url + "/fleet/status", timeout=10).json()
    assert [n["inflight"] for n in status["nodes"]] == [0, 0]  # every lease given back


def test_the_plan_answers_a_lane_attempt_when_no_attempt_is_left(
    serve_fleet: Callable[..., Served], start_sim: StartSim
) -> None:
    failing = start_sim(*FAST, "--error-rate", "1", "--error-status", "503")
    options = FleetOptions(routing=RoutingOptions(max_attempts=1))
    _, server = serve_fleet([failing.url], options=options)
    answer = httpx2.post(
        server.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    # The node's own 503, marked by the plan as its last answer (the lane sets no such
    # header), with the request id the plan's door gives every answer.
    assert answer.status_code == 503 and answer.headers["x-should-retry"] == "false"
    assert answer.headers["x-lmfleet-request-id"]
    assert lane(server, "failed_over") == 1 and lane(server, "answered") == 0
    assert sim_stats(failing.url)["errors_injected"] == 1  # sent once, not again


def test_a_caller_that_leaves_a_stream_frees_its_node(
    serve_fleet: Callable[..., Served], start_sim: StartSim
) -> None:
    slow = start_sim("--ttft-ms", "2", "--tpot-ms", "20", "--output-tokens", "1000")
    _, server = serve_fleet([slow.url])
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "stream": True}
    with (
        httpx2.Client(base_url=server.url, timeout=10) as caller,
        caller.stream("POST", "/v1/chat/completions", json=body) as stream,
    ):
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        assert sim_stats(slow.url)["inflight"] == 1
    # The connection is closed mid-answer (a thousand tokens take 20 s): the node's
    # connection is closed too, so the node stops generating at once.
    wait_until(lambda: sim_stats(slow.url)["inflight"] == 0, 5, "the node's slot freed")
    status = httpx2.get(server.url + "/fleet/status", timeout=10).json()
    assert [n["inflight"] for n in status["nodes"]] == [0]
    assert lane(server, "answered") == 1
