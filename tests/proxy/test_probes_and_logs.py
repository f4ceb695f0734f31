"""What an operator sees of a running proxy: `/liveness`, `/readiness`, `/health`, and
the log (one line per node state change, none per probe, a cut stream once).

Real `lmfleet sim` processes, the proxy under real uvicorn in the fleet's thread, so
its log records (lmfleet's and uvicorn's) reach `caplog` from that thread.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx2
import openai
import pytest
from support import StartSim, kill_mid_stream, sim_stats, wait_until

from lmfleet import LMFleet
from lmfleet.launch.process import free_port
from lmfleet.logs import configure_logging
from lmfleet.proxy import ProxyOptions, ProxyServer

Served = tuple[LMFleet, ProxyServer]
FAST = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")
SLOW_STREAM = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "20")
MODEL = "internlm/internlm2_5-7b-chat"
INTERVAL = 0.2
UNCOMPLETED = "ASGI callable returned without completing response"


def _probe(url: str, path: str) -> tuple[int, Any]:
    response = httpx2.get(url + path, timeout=5)
    return response.status_code, response.json()


def _readiness(url: str) -> tuple[int, Any]:
    return _probe(url, "/readiness")


def _states(body: dict[str, Any]) -> dict[str, str]:
    return {w["url"]: w["state"] for w in body["workers"]}


def test_liveness_and_readiness_with_zero_one_and_two_healthy_nodes(
    serve_fleet: Callable[..., Served], start_sim: StartSim
) -> None:
    _, server = serve_fleet([], min_ready=2)
    url = server.url

    # No node yet: alive (an orchestrator must not restart it), not ready, /health 503.
    assert _probe(url, "/liveness") == (200, {"status": "alive"})
    status, body = _readiness(url)
    assert status == 503, body
    assert body["status"] == "not_ready" and body["reason"].startswith("no node registered")
    assert (body["healthy_workers"], body["total_workers"], body["min_ready"]) == (0, 0, 2)
    assert body["workers"] == []
    assert _probe(url, "/health")[0] == 503

    a, b = start_sim(*FAST), start_sim(*FAST)
    assert httpx2.post(url + "/nodes/add", json={"url": a.url}).status_code == 200
    status, body = wait_until(lambda: _readiness(url), until=lambda r: r[1]["healthy_workers"] == 1)
    assert status == 503 and body["status"] == "not_ready", body  # one of min_ready=2
    assert body["reason"] == "1 of 1 node(s) healthy; 2 needed"
    (worker,) = body["workers"]
    assert set(worker) == {
        "url",
        "state",
        "is_healthy",
        "models",
        "message",
        "weight_version",
        "inflight",
        "peers",
    }
    assert (worker["url"], worker["state"], worker["is_healthy"]) == (a.url, "healthy", True)
    assert worker["models"] == [MODEL]
    assert _probe(url, "/health")[0] == 200  # /health: one healthy node can serve

    assert httpx2.post(url + "/nodes/add", json={"url": b.url}).status_code == 200
    status, body = wait_until(lambda: _readiness(url), until=lambda r: r[0] == 200)
    assert body["status"] == "ready" and "reason" not in body
    assert (body["healthy_workers"], body["total_workers"]) == (2, 2)
    assert _states(body) == {a.url: "healthy", b.url: "healthy"}

    b.process.kill()
    status, body = wait_until(lambda: _readiness(url), until=lambda r: r[0] == 503)
    assert body["healthy_workers"] == 1 and _states(body)[b.url] == "unhealthy", body
    dead = next(w for w in body["workers"] if w["url"] == b.url)
    assert not dead["is_healthy"] and "unreachable" in dead["message"], dead

    a.process.kill()
    status, body = wait_until(lambda: _readiness(url), until=lambda r: r[1]["healthy_workers"] == 0)
    assert status == 503 and _states(body) == {a.url: "unhealthy", b.url: "unhealthy"}
    assert _probe(url, "/health")[0] == 503
    assert _probe(url, "/liveness") == (200, {"status": "alive"})


def test_a_fleet_asleep_by_itself_stays_ready_and_lists_its_models(
    serve_fleet: Callable[..., Served], start_sim: StartSim
) -> None:
    """Auto-sleep put every node to sleep: the first request wakes one, so the proxy
    can serve. A readiness probe that said 503 now would hold back the very traffic
    that wakes it (and a client reading /v1/models would find nothing to ask for)."""
    nodes = [start_sim(*FAST).url, start_sim(*FAST).url]
    # Ready once one is healthy: the first may fall asleep before the second is up.
    _, server = serve_fleet(nodes, ready=1, auto_sleep_after=0.5, min_ready=2)
    url = server.url
    wait_until(
        lambda: _readiness(url)[1],
        until=lambda b: set(_states(b).values()) == {"sleeping"},
        what="both nodes asleep by themselves",
    )
    status, body = _readiness(url)
    assert status == 200 and body["status"] == "ready", body
    assert (body["healthy_workers"], body["wakes_on_demand"]) == (0, 2)
    assert _probe(url, "/health") == (
        200,
        {
            "status": "healthy",
            "healthy": 0,
            "wakes_on_demand": 2,
            "nodes": [{"url": n, "state": "sleeping"} for n in nodes],
        },
    )
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "wake up"}], max_tokens=2
    )
    assert answer.choices[0].finish_reason == "length"  # it woke a node to answer


def test_nodes_put_to_sleep_where_nothing_wakes_them_cannot_serve(
    serve_fleet: Callable[..., Served], two_nodes: list[str]
) -> None:
    fleet, server = serve_fleet(two_nodes)  # no wake on demand
    fleet.sleep()
    status, body = _readiness(server.url)
    assert status == 503 and body["wakes_on_demand"] == 0, body
    assert body["reason"] == "0 of 2 node(s) healthy; 1 needed"
    assert _probe(server.url, "/health")[0] == 503
    # The fleet still serves the model (a wake brings it back): it stays listed.
    assert [m["id"] for m in _probe(server.url, "/v1/models")[1]["data"]] == [MODEL]


def test_liveness_needs_no_key_even_when_nothing_else_is_public(
    serve_fleet: Callable[..., Served], two_nodes: list[str]
) -> None:
    options = ProxyOptions(api_keys=("k",), public_paths=())
    _, server = serve_fleet(two_nodes, serve={"options": options})
    assert httpx2.get(server.url + "/liveness").status_code == 200
    assert httpx2.get(server.url + "/readiness").status_code == 401
    auth = {"authorization": "Bearer k"}
    assert httpx2.get(server.url + "/readiness", headers=auth).status_code == 200
    defaults = ProxyOptions(api_keys=("k",))  # probes are public by default
    _, server = serve_fleet(two_nodes, serve={"options": defaults})
    assert httpx2.get(server.url + "/readiness").status_code == 200


def _node_lines(caplog: pytest.LogCaptureFixture, url: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("lmfleet") and url in r.getMessage()
    ]


def test_a_killed_node_is_logged_once_and_probes_are_not(
    serve_fleet: Callable[..., Served],
    start_sim: StartSim,
    caplog: pytest.LogCaptureFixture,
    operator_logging: None,
) -> None:
    caplog.set_level(logging.INFO)
    victim = start_sim(*FAST)
    # A sleeper whose /health lags 60 s behind its sleep (LMDeploy's snapshot does,
    # up to 12 s): while it sleeps, every probe asks its /is_sleeping through the
    # fleet's httpx2 client, which logs each request at INFO unless it is quieted.
    sleeper = start_sim("--health-poll-interval", "60", "--ttft-ms", "2", "--tpot-ms", "1")
    fleet, server = serve_fleet([victim.url, sleeper.url], health_interval=INTERVAL)
    fleet.sleep(nodes=[sleeper.url])

    mark = len(caplog.records)
    killed = time.monotonic()
    victim.process.kill()
    wait_until(
        lambda: _node_lines(caplog, victim.url),
        timeout=20 * INTERVAL,
        what="the killed node's state change in the proxy's log",
        until=lambda found: any("healthy -> unhealthy" in line for line in found),
    )
    assert time.monotonic() - killed < 20 * INTERVAL
    after = [r for r in caplog.records[mark:] if r.name.startswith("lmfleet")]
    assert len(after) == 1, [r.getMessage() for r in after]
    (record,) = after
    assert record.getMessage().startswith(f"node {victim.url} healthy -> unhealthy: unreachable")
    assert record.levelno == logging.WARNING
    fields = [getattr(record, key) for key in ("node", "previous", "state")]
    assert fields == [victim.url, "healthy", "unhealthy"]  # for JSON log shippers

    # Steady state for many intervals: the dead node probed, the sleeper confirmed
    # asleep on every probe. Not one record per probe, at INFO or otherwise.
    before = len(caplog.records)
    asked = sim_stats(sleeper.url)["by_path"].get("/is_sleeping", 0)
    wait_until(
        lambda: sim_stats(sleeper.url)["by_path"].get("/is_sleeping", 0),
        what="five more probes of the sleeper",
        until=lambda count: count >= asked + 5,
    )
    assert [r.getMessage() for r in caplog.records[before:]] == []
    chatty = [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]
    assert chatty == [], [r.getMessage() for r in chatty]
    assert [n.state.value for n in fleet.nodes] == ["unhealthy", "sleeping"]
    sleeping = [m for m in _node_lines(caplog, sleeper.url) if "->" in m]
    assert sleeping[1:] == [f"node {sleeper.url} healthy -> sleeping: going to sleep: draining"]
    assert server.running


def test_node_lifecycle_lines(
    serve_fleet: Callable[..., Served], start_sim: StartSim, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lmfleet")
    _, server = serve_fleet([])
    node = start_sim(*FAST)
    added = {"url": node.url, "status": {"models": [MODEL]}}
    assert httpx2.post(server.url + "/nodes/add", json=added).status_code == 200
    wait_until(
        lambda: _node_lines(caplog, node.url),
        until=lambda found: any("-> healthy" in line for line in found),
    )
    assert httpx2.post(server.url + "/fleet/sleep", params={"node": node.url}).status_code == 200
    assert httpx2.post(server.url + "/fleet/wakeup", params={"node": node.url}).status_code == 200
    assert httpx2.post(server.url + "/nodes/remove", json={"url": node.url}).status_code == 200
    lines = _node_lines(caplog, node.url)
    assert lines[0] == f"node {node.url} added (registered itself; models {MODEL})"
    assert lines[1].startswith(f"node {node.url} starting -> healthy: ")
    assert lines[1].endswith(f"; serves {MODEL}")
    assert lines[-1] == f"node {node.url} removed (was healthy)"
    # In this order; a monitor probe in flight across the wakeup may add a flip.
    expected = [
        f"node {node.url} healthy -> sleeping: going to sleep: draining",
        f"node {node.url} sleeping -> healthy: awake",
    ]
    rest = iter(lines[2:-1])
    assert all(line in rest for line in expected), lines


def test_a_stream_cut_by_a_killed_node_is_logged_once_and_ends_with_an_error_event(
    serve_fleet: Callable[..., Served], start_sim: StartSim, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    node = start_sim(*SLOW_STREAM, "--output-tokens", "400")  # about 8 s per stream
    _, server = serve_fleet([node.url])
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

    async def main() -> BaseException:
        chunks = 0

        async def read() -> None:
            nonlocal chunks
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "cut me"}],
                max_tokens=500,
                stream=True,
            )
            async for _ in stream:
                chunks += 1

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_mid_stream, node)
                try:
                    await read()
                except openai.APIError as exc:
                    return exc
        raise AssertionError(f"the cut stream ended without an error after {chunks} chunks")

    error = anyio.run(main)
    assert type(error) is openai.APIError, error  # the error event, not a dropped connection
    assert node.url in str(error) and "never replayed" in str(error), error
    assert error.body["code"] == 502 and error.body["type"] == "bad_gateway", error.body  # type: ignore[index]

    cut = [r for r in caplog.records if "cut after it started" in r.getMessage()]
    assert len(cut) == 1 and node.url in cut[0].getMessage(), [r.getMessage() for r in cut]
    assert cut[0].name == "lmfleet.proxy" and cut[0].levelno == logging.WARNING
    uvicorn_errors = [r.getMessage() for r in caplog.records if r.name.startswith("uvicorn")]
    assert not any(UNCOMPLETED in m or "Exception in ASGI" in m for m in uvicorn_errors)


def test_a_dropped_stream_ends_cleanly_for_any_http_client(
    serve_fleet: Callable[..., Served], start_sim: StartSim, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    node = start_sim(*FAST, "--drop-stream-after", "3")
    _, server = serve_fleet([node.url])
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "drop me"}],
        "max_tokens": 20,
        "stream": True,
    }
    # A complete HTTP response (httpx2 raises on a connection closed mid-body) whose
    # last event is the error, after the three the node sent; no [DONE].
    response = httpx2.post(server.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert len(events) == 4, events
    assert all(e.startswith('data: {"id"') for e in events[:3]), events
    assert events[3].startswith('data: {"error": {"object": "error"'), events[3]
    assert "[DONE]" not in response.text
    wait_until(
        lambda: [r for r in caplog.records if "cut after it started" in r.getMessage()],
        until=lambda found: len(found) == 1,
    )
    uvicorn_errors = [r.getMessage() for r in caplog.records if r.name.startswith("uvicorn")]
    assert not any(UNCOMPLETED in m for m in uvicorn_errors), uvicorn_errors


def test_access_log_comes_out_in_the_json_format(
    serve_fleet: Callable[..., Served],
    two_nodes: list[str],
    operator_logging: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", "json")  # as `lmfleet serve --log-format json --access-log`
    _, server = serve_fleet(two_nodes, serve={"options": ProxyOptions(access_log=True)})
    assert httpx2.get(server.url + "/liveness").status_code == 200
    entries = wait_until(
        lambda: [json.loads(line) for line in capsys.readouterr().err.splitlines()],
        until=lambda found: any(e["logger"] == "uvicorn.access" for e in found),
    )
    access = next(e for e in entries if e["logger"] == "uvicorn.access")
    assert access["message"].endswith('"GET /liveness HTTP/1.1" 200'), access
    assert access["level"] == "INFO" and "time" in access


def test_who_added_a_node_and_an_unreachable_registration_are_logged(
    serve_fleet: Callable[..., Served], caplog: pytest.LogCaptureFixture
) -> None:
    """An operator's hand-made /nodes/add is not called a registration; a registered
    node that cannot be reached gets one WARNING with the reason, as an unreachable
    --node URL does, and no more lines while it stays unreachable."""
    caplog.set_level(logging.INFO, logger="lmfleet")
    fleet, server = serve_fleet([])
    by_hand, announced = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    assert httpx2.post(server.url + "/nodes/add", json={"url": by_hand}).status_code == 200
    body = {"url": announced, "status": {"models": [MODEL], "role": 1}}
    assert httpx2.post(server.url + "/nodes/add", json=body).status_code == 200
    warned = wait_until(
        lambda: [
            r
            for r in caplog.records
            if r.levelno == logging.WARNING and announced in r.getMessage()
        ],
        what="the unreachable registration's warning",
    )
    assert _node_lines(caplog, by_hand)[0] == (
        f"node {by_hand} added (by an operator's POST /nodes/add)"
    )
    assert _node_lines(caplog, announced)[0] == (
        f"node {announced} added (registered itself; models {MODEL})"
    )
    (warning,) = warned
    assert warning.getMessage().startswith(f"node {announced} cannot be reached yet (unreachable:")
    assert "kept as starting" in warning.getMessage()
    failures = fleet.registry.get(announced).failures
    wait_until(lambda: fleet.registry.get(announced).failures, until=lambda n: n >= failures + 3)
    assert len(_node_lines(caplog, announced)) == 2  # added, and the one warning
    assert fleet.registry.get(announced).status.value == "starting"
