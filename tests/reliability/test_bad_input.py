"""Bad input on every proxy route: a documented status, an OpenAI-shaped error, and the
proxy keeps serving everyone else meanwhile."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import StartSim

from lmfleet import ConfigError, LMFleet
from lmfleet.proxy import ProxyOptions, ProxyServer

Served = tuple[LMFleet, ProxyServer]
QUICK = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")
MODEL = "internlm/internlm2_5-7b-chat"
ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/generate"),
    ("POST", "/pooling"),
    ("POST", "/v1/encode"),
    ("POST", "/nodes/add"),
    ("POST", "/nodes/remove"),
    ("POST", "/nodes/terminate"),
    ("POST", "/fleet/drain"),
]


def assert_openai_error(response: httpx2.Response) -> None:
    assert 400 <= response.status_code < 600, response.text
    body = response.json()
    assert body["object"] == "error" and isinstance(body["message"], str), body
    assert body["code"] == response.status_code


def still_serving(url: str) -> None:
    reply = httpx2.post(
        url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "ok?"}], "max_tokens": 1},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text


@pytest.fixture
def proxy(serve_fleet: Callable[..., Served], start_sim: StartSim) -> str:
    nodes = [start_sim(*QUICK).url for _ in range(2)]
    options = ProxyOptions(max_body_bytes=4096, body_timeout=1.0)
    _, server = serve_fleet(nodes, serve={"options": options})
    return server.url


BAD_BODIES = [
    b"{",  # truncated
    b'{"model": "x", "messages": [}',  # malformed
    b"\xff\xfe\x00garbage",  # not UTF-8
    b"[1, 2, 3]",  # JSON, wrong type
    b'"a string"',
    b'{"model": 42, "messages": "nope"}',  # wrong field types
    b'{"model": "' + MODEL.encode() + b'", "max_tokens": -5, "messages": []}',
    b'{"model": "no-such-model", "messages": []}',
    b'{"url": "ftp://example.org"}',
    b'{"url": 12}',
    b"x" * 10_000,  # over max_body_bytes
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_answers_bad_bodies_with_a_shaped_error(
    proxy: str, method: str, path: str
) -> None:
    for body in BAD_BODIES:
        response = httpx2.request(
            method, proxy + path, content=body, headers={"content-type": "application/json"}
        )
        assert_openai_error(response)
    still_serving(proxy)


def test_bad_admin_queries(proxy: str) -> None:
    for query in ("level=3", "level=x", "node=http://127.0.0.1:1"):
        response = httpx2.post(proxy + "/fleet/sleep?" + query)
        assert response.status_code in (400, 404), (query, response.text)
        assert_openai_error(response)
    response = httpx2.post(proxy + "/fleet/wakeup?node=ftp://nowhere")
    assert response.status_code in (400, 404) and response.json()["object"] == "error"
    assert {n["state"] for n in httpx2.get(proxy + "/fleet/status").json()["nodes"]} == {"healthy"}
    still_serving(proxy)


def test_bad_node_urls_are_refused(proxy: str) -> None:
    port = int(proxy.rsplit(":", 1)[1])
    for url in (
        "ftp://127.0.0.1:1",
        "javascript:alert(1)",
        "file:///etc/passwd",
        "http://",
        "http://127.0.0.1:notaport",
        f"http://127.0.0.1:{port}",  # the proxy itself: would loop
        f"http://localhost:{port}",
        "http://127.0.0.1:1/v1 x",
    ):
        response = httpx2.post(proxy + "/nodes/add", json={"url": url})
        assert response.status_code == 400, (url, response.text)
        assert_openai_error(response)
    assert len(httpx2.get(proxy + "/nodes/status").json()) == 2
    still_serving(proxy)


def test_invalid_strategy_names() -> None:
    with pytest.raises(ConfigError, match="valid names"):
        LMFleet.attach(["http://127.0.0.1:9"], strategy="fastest-please")


def test_slowloris_body_gets_408_while_others_are_served(proxy: str) -> None:
    port = int(proxy.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
            b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{"
        )
        still_serving(proxy)  # the stalled client blocks nobody
        # The 408 comes once body_timeout (1 s) is over: recv waits for it, until the
        # JSON error body is in or the proxy closes the connection.
        received = b""
        while not received.endswith(b"}") and (chunk := slow.recv(65536)):
            received += chunk
        answer = received.decode()
    assert answer.startswith("HTTP/1.1 408"), answer
    assert '"object": "error"' in answer or '"object":"error"' in answer


def test_header_injection_is_refused_before_it_reaches_a_node(proxy: str) -> None:
    port = int(proxy.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
            b"x-evil: a\rinjected: yes\r\ncontent-length: 2\r\n\r\n{}"
        )
        answer = raw.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 400"), answer
    with pytest.raises(httpx2.LocalProtocolError):  # clients refuse to send one at all
        httpx2.post(proxy + "/v1/chat/completions", headers={"x-evil": "a\r\nb: c"}, content=b"{}")
    still_serving(proxy)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from([MODEL, "nope", ""]) | json_values,
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]) | json_values})
            | json_values,
            max_size=3,
        )
        | json_values,
        "max_tokens": st.integers(-3, 4) | json_values,
        "stream": st.booleans() | json_values,
        "n": st.integers(-1, 2) | json_values,
    },
)


# The profile in tests/conftest.py, plus: the proxy fixture is meant to be shared by
# every example (one fleet, many bodies), and fewer examples (each is an HTTP round trip).
@settings(
    max_examples=60,
    suppress_health_check=[
        *settings.default.suppress_health_check,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(body=chat_bodies)
def test_fuzzed_chat_bodies_get_an_answer_never_a_crash(
    proxy: str, body: dict[str, object]
) -> None:
    response = httpx2.post(
        proxy + "/v1/chat/completions", content=json.dumps(body).encode(), timeout=10
    )
    if response.status_code != 200:
        assert_openai_error(response)
        assert response.status_code < 500, response.text
