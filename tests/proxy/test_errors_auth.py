"""Errors are OpenAI-shaped with the right status; client keys guard every route but two."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import StartSim, chat

from lmfleet import LMFleet
from lmfleet.launch.process import free_port
from lmfleet.proxy import ProxyServer

Served = tuple[LMFleet, ProxyServer]
FAST = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")
MODEL = "internlm/internlm2_5-7b-chat"


def _error(response: httpx2.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["object"] == "error" and body["code"] == status
    return str(body["message"])


def test_bad_requests(serve_fleet: Callable[..., Served], two_nodes: list[str]) -> None:
    _, server = serve_fleet(two_nodes, serve={"max_body_bytes": 2000})
    url = server.url
    chat_url = url + "/v1/chat/completions"
    assert "not valid JSON" in _error(httpx2.post(chat_url, content=b"{nope"), 400)
    unknown = _error(httpx2.post(chat_url, json={"model": "gpt-9", "messages": []}), 404)
    assert "gpt-9" in unknown and MODEL in unknown
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert "2000 bytes" in _error(httpx2.post(chat_url, json=big), 413)

    def chunked() -> object:
        yield b'{"model": "' + b"y" * 3000 + b'"}'

    sent = httpx2.post(chat_url, content=chunked(), headers={"content-type": "application/json"})
    _error(sent, 413)  # no Content-Length: counted while reading
    _error(httpx2.get(url + "/nope"), 404)
    wrong = httpx2.get(chat_url)
    _error(wrong, 405)
    assert wrong.headers["allow"] == "POST"
    _error(httpx2.post(url + "/v1/models"), 405)
    health = httpx2.get(url + "/health")
    assert health.status_code == 200 and health.json()["healthy"] == 2


def test_no_healthy_node_is_503_with_retry_after(serve_fleet: Callable[..., Served]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    _, server = serve_fleet([dead], ready=0, wait_for_node=0.3)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    response = httpx2.post(
        server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "model": "m"},
    )
    assert "no healthy node" in _error(response, 503)
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-should-retry"] == "false"  # the proxy already waited
    with pytest.raises(openai.InternalServerError):
        chat(client, "m", "hi")
    health = httpx2.get(server.url + "/health")
    assert health.status_code == 503
    assert health.json()["nodes"][0]["url"] == dead


def test_upstream_timeout_is_504(serve_fleet: Callable[..., Served], start_sim: StartSim) -> None:
    node = start_sim(*FAST, "--hang")
    fleet, server = serve_fleet([node.url], serve={"upstream_timeout": 0.5})
    response = httpx2.post(
        server.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    _error(response, 504)
    assert fleet.nodes[0].inflight == 0


def test_client_keys_and_node_keys(
    serve_fleet: Callable[..., Served], start_sim: StartSim, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    node_key = "node-secret-4711"
    node = start_sim(*FAST, "--api-keys", node_key)
    _, server = serve_fleet([node.url], api_key=node_key, serve={"api_keys": ["k1", "k2"]})
    url = server.url
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    _error(httpx2.post(url + "/v1/chat/completions", json=body), 401)
    bad = {"authorization": "Bearer nope"}
    _error(httpx2.post(url + "/v1/chat/completions", json=body, headers=bad), 401)
    _error(httpx2.get(url + "/nodes/status"), 401)
    _error(httpx2.get(url + "/v1/models"), 401)
    for key in ("k1", "k2"):
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        assert chat(client, MODEL, "hi", max_tokens=2).choices[0].message.content
    # the client's key is not forwarded: the node got its own key and answered 200
    assert httpx2.get(url + "/health").status_code == 200
    metrics = httpx2.get(url + "/metrics")
    assert metrics.status_code == 200
    auth = {"authorization": "Bearer k1"}
    pages = [
        metrics.text,
        httpx2.get(url + "/nodes/status", headers=auth).text,
        httpx2.get(url + "/fleet/status", headers=auth).text,
        httpx2.get(url + "/health").text,
        caplog.text,
    ]
    for page in pages:
        assert node_key not in page
    assert node.url in pages[1]


def test_metrics_parse_with_per_node_series(
    serve_fleet: Callable[..., Served], two_nodes: list[str]
) -> None:
    _, server = serve_fleet(two_nodes, strategy="round_robin")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    for i in range(4):
        chat(client, MODEL, f"m{i}", max_tokens=2)
    httpx2.post(server.url + "/v1/chat/completions", content=b"{")
    text = httpx2.get(server.url + "/metrics").text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    by_name: dict[str, list[dict[str, str]]] = {}
    for sample in samples:
        by_name.setdefault(sample.name, []).append(sample.labels)
    for name in (
        "lmfleet_node_inflight",
        "lmfleet_node_requests_total",
        "lmfleet_proxy_request_duration_seconds_count",
        "lmfleet_proxy_ttft_seconds_count",
    ):
        assert {labels["node"] for labels in by_name[name]} == set(two_nodes), name
    assert {"node": two_nodes[0], "state": "healthy"} in by_name["lmfleet_node_state"]
    assert {"kind": "bad_json"} in by_name["lmfleet_proxy_errors_total"]
    assert {"route": "/v1/chat/completions"} in by_name["lmfleet_proxy_requests_total"]


def test_unknown_model_is_an_openai_404_listing_the_served_models() -> None:
    """The proxy answers it (no node asked) in OpenAI's error shape, as the clients do."""
    with LMFleet.simulate(nodes=1, health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=60)
        server = fleet.serve(port=0)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        served = f"The model 'gpt-9' does not exist; served models: {MODEL}"
        with pytest.raises(openai.NotFoundError) as chat_error:
            chat(client, "gpt-9", "hi", max_tokens=1)
        with pytest.raises(openai.NotFoundError) as completion_error:
            client.completions.create(model="gpt-9", prompt="hi", max_tokens=1)
        for caught in (chat_error, completion_error):
            assert caught.value.body == {
                "object": "error",
                "message": served,
                "type": "not_found_error",
                "param": "model",
                "code": 404,
            }
        assert chat(client, MODEL, "hi", max_tokens=1).choices  # the served model routes
