"""The router and both transports over a scripted network (httpx2.MockTransport).

The nodes here are fakes at the HTTP level; everything of ours is real. The same
behaviour against real `lmfleet sim` processes is in tests/test_fleet.py.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable

import anyio
import httpx2
import pytest

from lmfleet.config import RoutingOptions
from lmfleet.errors import NodeUnavailableError, NoHealthyNodeError, StreamInterruptedError
from lmfleet.node.state import NodeStatus
from lmfleet.registry import NodeRegistry
from lmfleet.routing import resolve_strategy
from lmfleet.transport import AsyncFleetTransport, FleetTransport, Router
from lmfleet.transport.plan import Backoff

Handler = Callable[[httpx2.Request], httpx2.Response]
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def make_router(
    urls: list[str],
    strategy: str = "round_robin",
    models: tuple[str, ...] = ("m",),
    **options: object,
) -> Router:
    registry = NodeRegistry()
    for url in urls:
        registry.add(url, models=models, api_key=f"key-{url[-1]}")
        registry.modify(url, lambda s: s.evolve(status=NodeStatus.HEALTHY))
    opts = RoutingOptions(**{"wait_for_node": 0.2, "backoff": 0.0, **options})  # type: ignore[arg-type]
    return Router(registry, resolve_strategy(strategy), opts)


def post(client: httpx2.Client) -> httpx2.Response:
    return client.post("http://placeholder/v1/chat/completions", content=BODY)


def test_rewrites_url_host_and_node_key() -> None:
    seen: list[httpx2.Request] = []

    def node(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json={"ok": True})

    router = make_router(["http://n1:1", "http://n2:2"])
    with httpx2.Client(transport=FleetTransport(router, httpx2.MockTransport(node))) as client:
        for _ in range(4):
            assert post(client).json() == {"ok": True}
    assert Counter(str(r.url) for r in seen) == {
        "http://n1:1/v1/chat/completions": 2,
        "http://n2:2/v1/chat/completions": 2,
    }
    assert {r.headers["host"] for r in seen} == {"n1:1", "n2:2"}
    assert {r.headers["authorization"] for r in seen} == {"Bearer key-1", "Bearer key-2"}
    assert all(s.inflight == 0 and s.served == 2 for s in router.registry.snapshot())


def test_fails_over_on_connect_error_and_503_and_opens_the_circuit() -> None:
    def node(request: httpx2.Request) -> httpx2.Response:
        if request.url.host == "down":
            raise httpx2.ConnectError("refused", request=request)
        if request.url.host == "asleep":
            return httpx2.Response(503, json={"message": "sleeping"})
        return httpx2.Response(200, json={"node": request.url.host})

    router = make_router(["http://down:1", "http://asleep:2", "http://up:3"])
    with httpx2.Client(transport=FleetTransport(router, httpx2.MockTransport(node))) as client:
        for _ in range(3):
            assert post(client).json() == {"node": "up"}
    states = {s.url: s for s in router.registry.snapshot()}
    assert states["http://down:1"].status is NodeStatus.UNHEALTHY
    assert states["http://asleep:2"].status is NodeStatus.UNHEALTHY
    assert all(s.inflight == 0 for s in states.values())


def test_gives_up_after_max_attempts() -> None:
    def node(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.RemoteProtocolError("dropped", request=request)

    router = make_router(["http://a:1", "http://b:2"], max_attempts=3)
    with (
        httpx2.Client(transport=FleetTransport(router, httpx2.MockTransport(node))) as client,
        pytest.raises(NodeUnavailableError, match="3 attempt"),
    ):
        post(client)
    assert all(s.inflight == 0 and s.errors >= 1 for s in router.registry.snapshot())


def test_last_503_goes_back_to_the_caller_when_attempts_run_out() -> None:
    router = make_router(["http://a:1"], max_attempts=1)
    mock = httpx2.MockTransport(lambda r: httpx2.Response(503, json={"message": "busy"}))
    with httpx2.Client(transport=FleetTransport(router, mock)) as client:
        assert post(client).status_code == 503


def test_timeouts_are_the_callers_and_not_retried() -> None:
    calls = Counter[str]()

    def node(request: httpx2.Request) -> httpx2.Response:
        calls[request.url.host] += 1
        raise httpx2.ReadTimeout("slow", request=request)

    router = make_router(["http://a:1", "http://b:2"])
    with (
        httpx2.Client(transport=FleetTransport(router, httpx2.MockTransport(node))) as client,
        pytest.raises(httpx2.ReadTimeout),
    ):
        post(client)
    assert sum(calls.values()) == 1


def test_no_eligible_node_waits_then_raises() -> None:
    router = make_router([])
    router.registry.add("http://a:1", models=("m",))  # starting, never healthy
    mock = httpx2.MockTransport(lambda r: httpx2.Response(200))
    with (
        httpx2.Client(transport=FleetTransport(router, mock)) as client,
        pytest.raises(NoHealthyNodeError, match="http://a:1 starting"),
    ):
        post(client)


def test_unknown_model_is_a_404_listing_served_models() -> None:
    router = make_router(["http://a:1"], models=("m1", "m2"))
    mock = httpx2.MockTransport(lambda r: httpx2.Response(200))
    body = json.dumps({"model": "nope", "messages": []}).encode()
    with httpx2.Client(transport=FleetTransport(router, mock)) as client:
        response = client.post("http://x/v1/chat/completions", content=body)
    assert response.status_code == 404
    error = response.json()
    assert error["object"] == "error" and "m1, m2" in error["message"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"model":"m\\u00e9/x","messages":[]}', 200),  # compact, ASCII-escaped
        (b'{"model": "m\xc3\xa9/x", "messages": []}', 200),  # spaced, raw UTF-8
        (b'{"model" :\n"m\xc3\xa9/x"}', 200),  # unusual spacing: parsed, then known
        (b'{"messages":[{"role":"user","content":"m\\u00e9/x"}],"model":"other"}', 404),
        (b'{"messages":[]}', 200),  # no model field: any node
        (b"", 200),
    ],
)
def test_one_served_model_still_answers_unknown_models(body: bytes, status: int) -> None:
    """With one model, routing reads the body only when a substring search cannot
    tell that it names that model; either way an unknown model is the fleet's 404."""
    router = make_router(["http://a:1"], models=("m\u00e9/x",))
    sent: list[bytes] = []

    def node(request: httpx2.Request) -> httpx2.Response:
        sent.append(request.content)
        return httpx2.Response(200, json={"ok": True})

    with httpx2.Client(transport=FleetTransport(router, httpx2.MockTransport(node))) as client:
        response = client.post("http://x/v1/chat/completions", content=body)
    assert response.status_code == status, response.text
    if status == 404:
        assert response.json()["message"].endswith("served models: m\u00e9/x")
        assert sent == []


def test_inflight_lasts_until_the_stream_closes_even_early() -> None:
    router = make_router(["http://a:1"])
    chunks = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    mock = httpx2.MockTransport(lambda r: httpx2.Response(200, content=iter(chunks)))
    with httpx2.Client(transport=FleetTransport(router, mock)) as client:
        request = client.build_request("POST", "http://x/v1/chat/completions", content=BODY)
        response = client.send(request, stream=True)
        assert router.registry.get("http://a:1").inflight == 1
        next(iter(response.stream))  # type: ignore[call-overload]
        assert router.registry.get("http://a:1").inflight == 1
        response.close()  # early close
        state = router.registry.get("http://a:1")
        assert state.inflight == 0 and state.served == 1 and state.ttft is not None


def test_a_stream_that_breaks_midway_is_not_replayed() -> None:
    calls = Counter[str]()

    def broken() -> object:
        yield b"data: 1\n\n"
        raise httpx2.ReadError("connection reset")

    def node(request: httpx2.Request) -> httpx2.Response:
        calls[request.url.host] += 1
        return httpx2.Response(200, content=broken())  # type: ignore[arg-type]

    router = make_router(["http://a:1", "http://b:2"])
    with httpx2.Client(transport=FleetTransport(router, httpx2.MockTransport(node))) as client:
        request = client.build_request("POST", "http://x/v1/chat/completions", content=BODY)
        response = client.send(request, stream=True)
        with pytest.raises(StreamInterruptedError, match="never replayed"):
            for _ in response.iter_bytes():
                pass
        response.close()
    assert sum(calls.values()) == 1
    assert sum(s.errors for s in router.registry.snapshot()) == 1
    assert all(s.inflight == 0 for s in router.registry.snapshot())


@pytest.mark.anyio
async def test_async_transport_shares_the_same_rules() -> None:
    def node(request: httpx2.Request) -> httpx2.Response:
        if request.url.host == "down":
            raise httpx2.ConnectError("refused", request=request)
        return httpx2.Response(200, json={"node": request.url.host})

    router = make_router(["http://down:1", "http://up:2"])
    transport = AsyncFleetTransport(router, httpx2.MockTransport(node))
    async with httpx2.AsyncClient(transport=transport) as client:
        results = []

        async def one() -> None:
            response = await client.post("http://x/v1/chat/completions", content=BODY)
            results.append(response.json()["node"])

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
    assert results == ["up"] * 8
    assert all(s.inflight == 0 for s in router.registry.snapshot())


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    pause = Backoff(first=0.05, most=1.0, jitter=0.05, rng=random.Random(7))
    for attempt, low in ((1, 0.05), (2, 0.1), (3, 0.2), (4, 0.4)):
        assert low <= pause(attempt) <= low + 0.05
    assert pause(10) == 1.0
    assert Backoff(first=0.0, most=1.0, jitter=0.0)(3) == 0.0
    options = RoutingOptions(backoff=0.2, max_backoff=0.5)
    assert Backoff.of(options) == Backoff(first=0.2, most=0.5, jitter=0.2)
