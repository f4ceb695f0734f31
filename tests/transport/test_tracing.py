"""OpenTelemetry traces of routed requests (transport/tracing.py), as an operator turns
them on: only the standard `OTEL_*` variables, the SDK's OTLP exporter, and an OTLP
collector (here an HTTP server in the test that decodes what it receives).

A request sent with the caller's W3C `traceparent` that fails over (its first node
answers 503) gives one request span in the caller's trace, one attempt span per
node, and each node receives the trace as its own `traceparent`; through the proxy
(`lmfleet serve`) and through the fleet's client alike. Without the variables
nothing is traced."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest
from cli_support import Console
from support import SimNode, StartSim, sim_stats, wait_until

trace_service_pb2 = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    reason="the OTLP protocol package comes with lmfleet[otel]",
)

MODEL = "internlm/internlm2_5-7b-chat"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

pytestmark = pytest.mark.xdist_group("tracing")


class Collector:
    """An OTLP/HTTP trace receiver: every span it was sent, decoded."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        collector.spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def named(self, name: str) -> list[Any]:
        return [s for s in self.spans if s.name == name]


@pytest.fixture
def collector() -> Iterator[Collector]:
    one = Collector()
    yield one
    one.server.shutdown()


def _environment(collector: Collector) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within 50 ms, not 5 s
        "OTEL_SERVICE_NAME": "lmfleet-test",
    }


def _failing_and_good(start_sim: StartSim) -> tuple[SimNode, SimNode]:
    record = ("--record-headers", "traceparent")
    bad = start_sim("--fast", "--error-rate", "1.0", "--error-status", "503", *record)
    good = start_sim("--fast", *record)
    return bad, good


def _check_trace(collector: Collector, bad: SimNode, good: SimNode) -> None:
    """The request that failed over: in the caller's trace, one attempt per node, and
    each node given the attempt's own context."""

    def failed_over() -> list[Any]:
        return [
            span
            for span in collector.named("lmfleet.request")
            if "failover" in {event.name for event in span.events}
        ]

    wait_until(failed_over, 20, "the failed-over request's span exported")
    (request,) = failed_over()
    assert request.trace_id.hex() == TRACE_ID  # in the caller's trace
    assert request.parent_span_id.hex() == TRACEPARENT.split("-")[2]
    assert "route" in {event.name for event in request.events}

    def attempts() -> list[Any]:
        return [
            s for s in collector.named("lmfleet.attempt") if s.parent_span_id == request.span_id
        ]

    wait_until(lambda: len(attempts()) == 2, 20, "its two attempt spans")
    nodes = {
        next(a.value.string_value for a in span.attributes if a.key == "server.address"): span
        for span in attempts()
    }
    assert set(nodes) == {bad.url, good.url}
    assert all(span.trace_id.hex() == TRACE_ID for span in nodes.values())
    assert "first_byte" in {e.name for e in nodes[good.url].events}
    for node in (bad, good):  # each node got the trace, as its attempt's own context
        sent = sim_stats(node.url)["headers"]["traceparent"]
        expected = f"00-{TRACE_ID}-{nodes[node.url].span_id.hex()}-01"
        assert expected in sent, (node.url, sent, expected)


def _post_traced(base: str, body: dict[str, Any]) -> None:
    """A chat through the proxy at `base`, in the caller's trace (`TRACEPARENT`)."""
    answer = httpx2.post(
        base + "/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT}, timeout=10
    )
    assert answer.status_code == 200, answer.text


def _chats(node: SimNode) -> int:
    return int(sim_stats(node.url)["by_path"].get("/v1/chat/completions", 0))


def test_a_request_that_failed_over_through_the_proxy(
    collector: Collector, start_sim: StartSim, console: Callable[..., Console]
) -> None:
    bad, good = _failing_and_good(start_sim)
    proxy = console(
        "serve",
        "--port",
        "0",
        "--disable-cache-status",
        "--node",
        bad.url,
        "--node",
        good.url,
        env=_environment(collector),
    )
    base = proxy.wait_for(r"lmfleet proxy on (http://127\.0\.0\.1:\d+)").group(1)
    wait_until(
        lambda: httpx2.get(base + "/readiness", timeout=5).json()["healthy_workers"] == 2,
        20,
        "both nodes healthy",
    )
    for _ in range(20):  # until a request is routed to the failing node first
        before = _chats(bad)
        _post_traced(base, CHAT)
        if _chats(bad) > before:
            break
    else:
        pytest.fail("no request went to the failing node first")
    _check_trace(collector, bad, good)
    # The proxy's fast lane made that first attempt, traced, and the plan went on
    # with the lane's span (one request span with both attempts: `_check_trace`).
    metrics = httpx2.get(base + "/metrics", timeout=5).text
    assert 'lmfleet_proxy_fast_lane_total{outcome="failed_over"} 1.0' in metrics, metrics


def test_a_request_the_proxys_fast_lane_answers_is_traced_as_the_plan_traces(
    collector: Collector, start_sim: StartSim, console: Callable[..., Console]
) -> None:
    """A plain chat and a plain stream, answered by the fast lane (lmfleet/proxy/
    fast_lane.py): each one request span in the caller's trace with its `route`
    event, one attempt span with its `first_byte`, and the node given the attempt's
    own context (not the caller's)."""
    node = start_sim("--fast", "--record-headers", "traceparent")
    proxy = console(
        "serve", "--port", "0", "--disable-cache-status", "--node", node.url,
        env=_environment(collector),
    )  # fmt: skip
    base = proxy.wait_for(r"lmfleet proxy on (http://127\.0\.0\.1:\d+)").group(1)
    wait_until(
        lambda: httpx2.get(base + "/readiness", timeout=5).json()["healthy_workers"] == 1,
        20,
        "the node healthy",
    )
    for body in (CHAT, {**CHAT, "stream": True}):
        _post_traced(base, body)
    metrics = httpx2.get(base + "/metrics", timeout=5).text
    assert 'lmfleet_proxy_fast_lane_total{outcome="answered"} 2.0' in metrics, metrics

    def attempts_of(request: Any) -> list[Any]:
        return [
            s for s in collector.named("lmfleet.attempt") if s.parent_span_id == request.span_id
        ]

    def traced() -> list[Any]:
        requests = collector.named("lmfleet.request")
        return requests if len(requests) == 2 and all(attempts_of(r) for r in requests) else []

    wait_until(traced, 20, "two request spans with their attempts exported")
    sent = sim_stats(node.url)["headers"]["traceparent"]
    for request in traced():
        assert request.trace_id.hex() == TRACE_ID
        assert request.parent_span_id.hex() == TRACEPARENT.split("-")[2]
        assert "route" in {event.name for event in request.events}
        (attempt,) = attempts_of(request)
        assert "first_byte" in {event.name for event in attempt.events}
        assert f"00-{TRACE_ID}-{attempt.span_id.hex()}-01" in sent, sent
    assert TRACEPARENT not in sent  # the caller's own context is not the node's


CLIENT = """
import sys
import httpx2
from opentelemetry import trace
from lmfleet import LMFleet

def chats(url):
    stats = httpx2.get(url + "/sim/stats", timeout=5).json()
    return stats["by_path"].get("/v1/chat/completions", 0)

with LMFleet.attach(sys.argv[1:], strategy="round_robin", health_interval=0.2) as fleet:
    fleet.wait_ready(timeout=20, min_ready=2)  # both: round robin meets the failing one
    client = fleet.client(max_retries=0)
    for _ in range(20):  # until one request was sent to the failing node first
        before = chats(sys.argv[1])
        client.chat.completions.create(
            model=fleet.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_headers={"traceparent": sys.argv[0]},
        )
        if chats(sys.argv[1]) > before:
            break
trace.get_tracer_provider().shutdown()  # flush the exporter before the exit
"""


def test_a_request_that_failed_over_through_the_fleets_client(
    collector: Collector, start_sim: StartSim
) -> None:
    bad, good = _failing_and_good(start_sim)
    env = {**os.environ, **_environment(collector)}
    done = subprocess.run(
        [sys.executable, "-c", CLIENT.replace("sys.argv[0]", repr(TRACEPARENT)), bad.url, good.url],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _chats(bad) == 1  # exactly one request was sent there first
    _check_trace(collector, bad, good)


def test_without_the_variables_nothing_is_traced(collector: Collector) -> None:
    from lmfleet.transport import tracing

    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ):
        assert name not in os.environ, f"{name} is set in the test environment"
    assert not tracing.asked_by_environment()
    assert tracing.tracer() is None
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}
    for name, value in env.items():
        os.environ[name] = value
    try:
        assert not tracing.asked_by_environment()  # the SDK's own off switch wins
    finally:
        for name in env:
            del os.environ[name]


def test_both_distserve_phases_are_attempts_of_one_traced_request(
    collector: Collector, start_sim: StartSim, console: Callable[..., Console]
) -> None:
    """A DistServe request: one request span, an attempt span for its prefill node and
    one for its decode node, and each node receives its own attempt's context."""
    record = ("--record-headers", "traceparent")
    prefill = start_sim("--fast", "--role", "prefill", *record)
    decode = start_sim("--fast", "--role", "decode", *record)
    proxy = console(
        "serve",
        "--port",
        "0",
        "--disable-cache-status",
        "--serving-strategy",
        "DistServe",
        env=_environment(collector),
    )
    base = proxy.wait_for(r"lmfleet proxy on (http://127\.0\.0\.1:\d+)").group(1)
    for node, role in ((prefill, 2), (decode, 3)):
        status = {"models": [MODEL], "role": role}
        added = httpx2.post(base + "/nodes/add", json={"url": node.url, "status": status})
        assert added.status_code == 200, added.text
    wait_until(
        lambda: httpx2.get(base + "/readiness", timeout=5).json()["healthy_workers"] == 2,
        20,
        "both nodes healthy",
    )
    headers = {"traceparent": TRACEPARENT}
    answer = httpx2.post(base + "/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    (request,) = wait_until(lambda: collector.named("lmfleet.request"), 20, "the request span")
    assert request.trace_id.hex() == TRACE_ID

    def attempts() -> list[Any]:
        return [
            s for s in collector.named("lmfleet.attempt") if s.parent_span_id == request.span_id
        ]

    wait_until(lambda: len(attempts()) == 2, 20, "an attempt span per phase")
    for node in (prefill, decode):
        (span,) = [
            s
            for s in attempts()
            if any(
                a.key == "server.address" and a.value.string_value == node.url for a in s.attributes
            )
        ]
        sent = sim_stats(node.url)["headers"]["traceparent"]
        assert sent == {f"00-{TRACE_ID}-{span.span_id.hex()}-01": 1}, (node.url, sent)
