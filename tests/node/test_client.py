"""The node client: the one header builder and the one error mapping, over real sim
processes; and that nothing else in the package spells a node's Bearer header."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import httpx2
import pytest
from support import SimNode, StartSim, sim_stats

import lmfleet
from lmfleet.errors import NodeCommandError
from lmfleet.launch.process import free_port
from lmfleet.node.client import NodeAddress, NodeCallError, NodeClient, auth_headers, call_failed
from lmfleet.node.profile import LMDEPLOY
from lmfleet.wire.prober import Prober

pytestmark = pytest.mark.anyio

KEY = "node-key"
MODEL = "served-name"


@pytest.fixture
def keyed(start_sim: StartSim) -> SimNode:
    return start_sim("--api-keys", KEY, "--served-model-name", MODEL)


def test_one_header_builder() -> None:
    """Only the node client spells the node's key as a header; the proxy's check of
    its own callers' keys (`proxy/app.py`) and the emulated server are not node I/O."""
    package = Path(lmfleet.__file__).parent
    spelt = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if re.search(r"['\"]Bearer ", path.read_text())
    }
    own = {p for p in spelt if not p.startswith("sim/")} - {"proxy/app.py"}
    assert own == {"node/client.py"}
    assert auth_headers(None) == ()
    assert auth_headers("k") == (("Authorization", "Bearer k"),)


async def test_every_command_carries_the_key(keyed: SimNode) -> None:
    node = NodeAddress(keyed.url, KEY)
    async with httpx2.AsyncClient() as http:
        nodes = NodeClient(http)
        assert await nodes.models(node, 5) == (MODEL,)
        assert await nodes.is_sleeping(node, 5) is False
        await nodes.sleep(node, 1, 5)
        assert await nodes.is_sleeping(node, 5) is True
        await nodes.wakeup(node, ["weights"], 5)
        assert await nodes.is_sleeping(node, 5) is True  # the KV cache still sleeps
        await nodes.wakeup(node, None, 5)
        assert await nodes.is_sleeping(node, 5) is False
        assert await nodes.weights_backend(node, 5) == "turbomind"
    by_path = sim_stats(keyed.url, KEY)["by_path"]
    for path in ("/v1/models", "/is_sleeping", "/sleep", "/wakeup", "/update_weights_from_ipc"):
        assert by_path.get(path), (path, by_path)


async def test_probes_carry_the_key(keyed: SimNode) -> None:
    nodes = NodeClient()
    prober = Prober()
    try:
        assert LMDEPLOY.metrics is not None
        paths = (*LMDEPLOY.health, LMDEPLOY.metrics.path)
        keyless = await prober.get_many(nodes.probe(NodeAddress(keyed.url), paths), 5)
        answers = await prober.get_many(nodes.probe(NodeAddress(keyed.url, KEY), paths), 5)
    finally:
        await prober.aclose()
    assert [status for status, _ in answers] == [200, 200]
    assert b"lmdeploy:num_requests_running" in answers[1][1]
    assert keyless[0][0] == 200  # LMDeploy's /health needs no key


async def test_one_error_mapping(keyed: SimNode) -> None:
    """A refusal, an unreachable node and a timeout: one error type, one message shape,
    and the node's own words kept."""
    async with httpx2.AsyncClient() as http:
        nodes = NodeClient(http)
        with pytest.raises(NodeCallError) as refused:
            await nodes.models(NodeAddress(keyed.url, "wrong"), 5)
        assert refused.value.status == 401
        assert str(refused.value).startswith(f"GET {keyed.url}/v1/models answered HTTP 401: ")
        assert str(refused.value).endswith(
            "LMFleet.attach(api_key=...), lmfleet serve --node-api-key, or the node's own key-env=)"
        )
        assert isinstance(refused.value, NodeCommandError)  # what admin callers catch

        dead = f"http://127.0.0.1:{free_port()}"
        with pytest.raises(NodeCallError) as unreachable:
            await nodes.sleep(NodeAddress(dead), 1, 5)
        assert unreachable.value.status is None
        assert str(unreachable.value).startswith(f"POST {dead}/sleep failed: ConnectError")

        # A listening socket that never answers: the call's own timeout ends it.
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            url = f"http://127.0.0.1:{silent.getsockname()[1]}"
            assert await nodes.is_sleeping(NodeAddress(url), 0.2) is None  # "cannot say"
            with pytest.raises(NodeCallError) as slow:
                await nodes.models(NodeAddress(url), 0.2)
        assert slow.value.status is None
        assert str(slow.value).startswith(f"GET {url}/v1/models failed: ReadTimeout")


def test_the_mapping_reads_any_transports_outcome() -> None:
    """DistServe's control steps run in a sync or an async transport and get back a
    response, an exception or nothing: the same mapping reads all three."""
    request = NodeClient().request(NodeAddress("http://n:1", KEY), "POST", "/x", json={}, timeout=1)
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    ok = httpx2.Response(200, json={}, request=request)
    assert call_failed("http://n:1", request, ok) is None
    bad = call_failed("http://n:1", request, httpx2.Response(503, text="busy", request=request))
    assert bad is not None and (bad.status, bad.text) == (503, "busy")
    gone = call_failed("http://n:1", request, httpx2.ConnectError("refused"))
    assert gone is not None and str(gone) == "POST http://n:1/x failed: ConnectError: refused"
    none = call_failed("http://n:1", request, None)
    assert none is not None and "no answer" in str(none)


def test_aim_points_a_routed_request_at_its_node() -> None:
    nodes = NodeClient()
    request = httpx2.Request("POST", "http://placeholder/v1/chat/completions?x=1", json={})
    nodes.aim(request, NodeAddress("http://127.0.0.1:9", KEY))
    assert str(request.url) == "http://127.0.0.1:9/v1/chat/completions?x=1"
    assert request.headers["host"] == "127.0.0.1:9"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    keyless = httpx2.Request("GET", "http://placeholder/v1/models")
    nodes.aim(keyless, NodeAddress("http://127.0.0.1:9"))
    assert "authorization" not in keyless.headers


async def test_abort_one_session_or_all_and_the_engines_refusal(start_sim: StartSim) -> None:
    """LMDeploy's `/abort_request`: 501 unless the server runs with
    `--enable-abort-handling`, 400 for a session it does not know, 200 for all."""
    plain = start_sim()
    able = start_sim("--enable-abort-handling")
    async with httpx2.AsyncClient() as http:
        nodes = NodeClient(http)
        with pytest.raises(NodeCallError) as refused:
            await nodes.abort(NodeAddress(plain.url), None, 5)
        assert refused.value.status == 501 and "--enable-abort-handling" in refused.value.text
        with pytest.raises(NodeCallError) as unknown:
            await nodes.abort(NodeAddress(able.url), 12345, 5)
        assert unknown.value.status == 400 and "12345" in unknown.value.text
        await nodes.abort(NodeAddress(able.url), None, 5)
    assert sim_stats(able.url)["by_path"]["/abort_request"] == 2
