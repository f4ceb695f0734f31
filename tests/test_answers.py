"""The answers table (lmfleet/answers.py): each row as the fleet's clients raise it and
as the proxy answers it, over real sims and a real uvicorn proxy.

Every row is reached here, or named in `ELSEWHERE` with the test that reaches it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from support import LOADS_WEIGHTS, StartSim, wait_until

import lmfleet.answers as answers
from lmfleet import LMFleet
from lmfleet.errors import (
    FleetBusyError,
    MigrationError,
    NodeUnavailableError,
    NoHealthyNodeError,
)
from lmfleet.proxy import ProxyServer

Served = tuple[LMFleet, ProxyServer]
FAST = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")
MODEL = "internlm/internlm2_5-7b-chat"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


# -- the table itself ----------------------------------------------------------------


def test_routed_exceptions_map_to_their_rows() -> None:
    request = httpx2.Request("POST", "http://n:1/v1/chat/completions")
    cases: list[tuple[BaseException, answers.Answer]] = [
        (FleetBusyError("busy", request=request), answers.FLEET_BUSY),
        (NoHealthyNodeError("none", request=request), answers.NO_HEALTHY_NODE),
        (NodeUnavailableError("all failed", request=request), answers.NODE_UNAVAILABLE),
        (httpx2.PoolTimeout("pool"), answers.CONNECTION_LIMIT),
        (httpx2.ReadTimeout("read"), answers.UPSTREAM_TIMEOUT),
        (httpx2.ConnectError("refused"), answers.UPSTREAM_ERROR),
        (MigrationError("pair", request=request), answers.UPSTREAM_ERROR),
    ]
    for exc, row in cases:
        assert answers.routed(exc) is row, exc
    stopping = NoHealthyNodeError("gone", request=request)
    assert answers.routed(stopping, stopping=True) is answers.SHUTTING_DOWN
    assert answers.routed(ValueError("a bug")) is None
    assert answers.cut(httpx2.ReadTimeout("silent")) is answers.INTERRUPTED_TIMEOUT
    assert answers.cut(httpx2.RemoteProtocolError("dropped")) is answers.INTERRUPTED


def test_row_headers_say_when_and_whether_to_retry() -> None:
    assert answers.FLEET_BUSY.headers(retry_after=0.2) == [(b"retry-after", b"1")]
    assert answers.NO_HEALTHY_NODE.headers(health_interval=2.5) == [
        (b"retry-after", b"3"),
        (b"x-should-retry", b"false"),
    ]
    assert answers.NODE_UNAVAILABLE.headers() == [(b"x-should-retry", b"false")]
    assert answers.SHUTTING_DOWN.headers(health_interval=2) == [(b"retry-after", b"2")]
    assert answers.UNKNOWN_MODEL.headers() == []
    kinds = [row.kind for row in answers.ROWS]
    assert len(kinds) - len(set(kinds)) == 1  # the two `interrupted` rows share a label


def test_docs_show_the_table() -> None:
    """docs/proxy.md's error table has each row: kind, status, type, retry headers."""
    text = (Path(__file__).parent.parent / "docs" / "proxy.md").read_text()
    for row in answers.ROWS:
        retry = {"none": "", "given": "the error's (1 s)", "health": "health interval"}
        cells = f"| `{row.kind}` | {row.status} | `{row.error_type}` | "
        cells += f"{retry[row.retry_after.value]} | {'yes' if row.no_retry else ''} |"
        assert cells in text, cells


# -- both doors ------------------------------------------------------------------------


@dataclass
class Scenario:
    row: answers.Answer
    sim: tuple[str, ...] = FAST
    fleet: dict[str, Any] = field(default_factory=dict)
    serve: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=lambda: dict(CHAT))
    headers: dict[str, str] = field(default_factory=dict)
    asleep: bool = False
    client_sees: type[BaseException] | None = None
    """What the fleet's client raises (default: the row's `raised`)."""
    client_timeout: float | None = None


SCENARIOS = {
    "fleet_busy": Scenario(answers.FLEET_BUSY, fleet={"admission_queue": 0}, asleep=True),
    "no_healthy_node": Scenario(answers.NO_HEALTHY_NODE, fleet={"wait_for_node": 0.3}, asleep=True),
    "node_unavailable": Scenario(
        answers.NODE_UNAVAILABLE, sim=(*FAST, "--hang"), fleet={"first_byte_timeout": 0.3}
    ),
    "upstream_timeout": Scenario(
        answers.UPSTREAM_TIMEOUT,
        sim=(*FAST, "--hang"),
        serve={"upstream_timeout": 0.3},
        client_sees=openai.APITimeoutError,
        client_timeout=0.3,
    ),
    "unknown_model": Scenario(
        answers.UNKNOWN_MODEL, body={**CHAT, "model": "nope"}, client_sees=openai.NotFoundError
    ),
    "bad_version": Scenario(
        answers.BAD_VERSION,
        headers={"x-lmfleet-weight-version": "three"},
        client_sees=openai.BadRequestError,
    ),
    "bad_priority": Scenario(
        answers.BAD_PRIORITY,
        headers={"x-lmfleet-priority": "urgent"},
        client_sees=openai.BadRequestError,
    ),
    "bad_timeout": Scenario(
        answers.BAD_TIMEOUT,
        headers={"x-lmfleet-timeout": "-1"},
        client_sees=openai.BadRequestError,
    ),
    "unknown_ask": Scenario(
        answers.UNKNOWN_ASK,
        headers={"x-lmfleet-max-stalenes": "0"},  # a typo: no bound would have held
        client_sees=openai.BadRequestError,
    ),
    "interrupted": Scenario(
        answers.INTERRUPTED,
        sim=(*FAST, "--drop-stream-after", "2", "--output-tokens", "50"),
        body={**CHAT, "stream": True, "max_tokens": 50},
    ),
}

ELSEWHERE = {
    answers.SHUTTING_DOWN: "tests/cli/test_signals.py (a proxy stopped with waiters, streams)",
    answers.FLEET_CLOSED: "tests/test_fleet.py (a closed fleet's clients; no proxy runs then)",
    answers.CONNECTION_LIMIT: "tests/proxy/test_upstream_pool.py, wire/test_upstream_pool.py",
    answers.UPSTREAM_ERROR: "test_routed_exceptions_map_to_their_rows (a non-retryable "
    "transport error; a DistServe MigrationError in tests/distserve)",
    answers.INTERRUPTED_TIMEOUT: "test_routed_exceptions_map_to_their_rows (answers.cut): no "
    "sim fault falls silent mid-stream yet; the event itself is INTERRUPTED's, tested here",
    answers.WEIGHT_UPDATE_UNSUPPORTED: "tests/proxy/test_update_weights_route.py (501)",
    answers.BODY_TIMEOUT: "tests/reliability/test_bad_input.py (a stalled body)",
    answers.INTERNAL: "never on purpose: an exception no row names (answers.routed is None)",
}
"""Rows reached by other tests, each for a reason it cannot be reached here."""

PROXY_ONLY = (
    answers.BAD_JSON,
    answers.BODY_TOO_LARGE,
    answers.UNAUTHORIZED,
    answers.NO_ROUTE,
    answers.BAD_METHOD,
    answers.BAD_REQUEST,
    answers.UNKNOWN_NODE,
    answers.UNKNOWN_REQUEST,
)
"""Rows of the proxy's own input (a fleet client builds its own requests)."""

ADMIN = (answers.WEIGHT_UPDATE_FAILED, answers.NODE_COMMAND)
"""Rows of the proxy's admin routes, reached in `test_the_admin_rows`."""


def test_every_row_is_reached_somewhere() -> None:
    reached = {s.row for s in SCENARIOS.values()} | set(ELSEWHERE) | set(PROXY_ONLY)
    assert set(answers.ROWS) == reached | set(ADMIN)
    assert len(answers.ROWS) == len(SCENARIOS) + len(ELSEWHERE) + len(PROXY_ONLY) + len(ADMIN)


@pytest.fixture
def scenario_fleet(start_sim: StartSim) -> Iterator[Callable[[Scenario], Served]]:
    fleets: list[LMFleet] = []

    def make(scenario: Scenario) -> Served:
        node = start_sim(*scenario.sim)
        fleet = LMFleet.attach([node.url], health_interval=0.2, **scenario.fleet)
        fleets.append(fleet)
        fleet.wait_ready(timeout=30)
        if scenario.asleep:
            fleet.sleep()
        return fleet, fleet.serve(port=0, **scenario.serve)

    yield make
    for fleet in fleets:
        fleet.close()


def _errors(server: ProxyServer, kind: str) -> float:
    for line in httpx2.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(f'lmfleet_proxy_errors_total{{kind="{kind}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_row_through_both_doors(name: str, scenario_fleet: Callable[[Scenario], Served]) -> None:
    scenario = SCENARIOS[name]
    row = scenario.row
    fleet, server = scenario_fleet(scenario)

    # The fleet's own client: the typed exception the row mirrors.
    client = fleet.client(max_retries=0, timeout=scenario.client_timeout)
    expected = scenario.client_sees or row.raised
    assert expected is not None
    with pytest.raises(expected):
        answer = client.chat.completions.create(**scenario.body, extra_headers=scenario.headers)
        for _ in answer if scenario.body.get("stream") else ():
            pass

    # The proxy: the row's status, error type, headers and metric.
    before = _errors(server, row.kind)
    reply = httpx2.post(
        server.url + "/v1/chat/completions",
        json=scenario.body,
        headers=scenario.headers,
        timeout=30,
    )
    if scenario.body.get("stream"):
        assert reply.status_code == 200  # the stream had started: an error event ends it
        events = [line for line in reply.text.splitlines() if line.startswith("data: {")]
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert (error["code"], error["type"]) == (row.status, row.error_type)
    else:
        assert reply.status_code == row.status, reply.text
        body = reply.json()
        assert (body["object"], body["type"], body["code"]) == ("error", row.error_type, row.status)
        assert ("retry-after" in reply.headers) == (row.retry_after is not answers.RetryAfter.NONE)
        assert (reply.headers.get("x-should-retry") == "false") == row.no_retry
    wait_until(lambda: _errors(server, row.kind), until=lambda n: n >= before + 1)
    if scenario.asleep:
        assert fleet.registry.waiting == 0


def test_the_proxys_own_rows(start_sim: StartSim) -> None:
    """Rows about the request as it reached the proxy, each with its metric."""
    node = start_sim(*FAST)
    with LMFleet.attach([node.url], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        server = fleet.serve(port=0, api_keys=["k"], max_body_bytes=1000)
        auth = {"authorization": "Bearer k"}
        url = server.url
        cases = [
            (answers.UNAUTHORIZED, lambda: httpx2.post(url + "/v1/chat/completions", json=CHAT)),
            (
                answers.BAD_JSON,
                lambda: httpx2.post(
                    url + "/v1/chat/completions",
                    content=b"{nope",
                    headers={**auth, "content-type": "application/json"},
                ),
            ),
            (
                answers.BODY_TOO_LARGE,
                lambda: httpx2.post(
                    url + "/v1/chat/completions",
                    json={**CHAT, "pad": "x" * 2000},
                    headers=auth,
                ),
            ),
            (answers.NO_ROUTE, lambda: httpx2.get(url + "/nowhere", headers=auth)),
            (answers.BAD_METHOD, lambda: httpx2.get(url + "/nodes/add", headers=auth)),
            (
                answers.BAD_REQUEST,
                lambda: httpx2.post(url + "/nodes/add", json={"url": "ftp://x"}, headers=auth),
            ),
            (
                answers.UNKNOWN_NODE,
                lambda: httpx2.post(
                    url + "/nodes/remove", json={"url": "http://127.0.0.1:9"}, headers=auth
                ),
            ),
            (
                answers.UNKNOWN_REQUEST,
                lambda: httpx2.post(url + "/fleet/abort?request_id=nope", headers=auth),
            ),
        ]
        assert {row for row, _ in cases} == set(PROXY_ONLY)
        for row, send in cases:
            before = _errors(server, row.kind)
            reply = send()
            assert reply.status_code == row.status, (row.kind, reply.text)
            body = reply.json()
            assert (body["type"], body["code"]) == (row.error_type, row.status), row.kind
            assert _errors(server, row.kind) == before + 1, row.kind


def test_the_admin_rows(start_sim: StartSim) -> None:
    """A weight update every node fails (502), a node that refuses to terminate (502)."""
    node = start_sim(*FAST, *LOADS_WEIGHTS, "--update-weights-error", "503")
    with LMFleet.attach([node.url], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        server = fleet.serve(port=0)
        calls = [
            (
                answers.WEIGHT_UPDATE_FAILED,
                lambda: httpx2.post(
                    server.url + "/fleet/update_weights",
                    json={"version": 1, "payload": "x"},
                    timeout=60,
                ),
            ),
            (  # no --allow-terminate-by-client: the node refuses
                answers.NODE_COMMAND,
                lambda: httpx2.post(
                    server.url + "/nodes/terminate", json={"url": node.url}, timeout=30
                ),
            ),
        ]
        assert [row for row, _ in calls] == list(ADMIN)
        for row, send in calls:
            before = _errors(server, row.kind)
            reply = send()
            assert reply.status_code == row.status, (row.kind, reply.text)
            assert reply.json()["type"] == row.error_type, row.kind
            assert _errors(server, row.kind) == before + 1, row.kind
