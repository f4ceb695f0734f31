"""Real `lmfleet sim` processes: sleep aborts, health lag, keys, faults, registration."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import httpx2
import openai
import pytest
from support import wait_until, wait_until_async

from lmfleet.launch.process import ManagedProcess, free_port, wait_for_port
from tests.sim.conftest import MODEL, chat_body

JSON = {"content-type": "application/json"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _data_lines(lines: list[str]) -> list[Any]:
    return [json.loads(x[6:]) for x in lines if x.startswith("data: {")]


@pytest.mark.anyio
async def test_sleep_aborts_in_flight_streams_and_queued_requests(start_sim: Any) -> None:
    node = start_sim(
        "--ttft-ms", "5", "--tpot-ms", "30", "--output-tokens", "500", "--max-batch", "1"
    )
    lines: list[str] = []
    results: dict[str, Any] = {}

    async with httpx2.AsyncClient(base_url=node.url, timeout=30) as client:

        async def streamer() -> None:
            body = chat_body(stream=True, stream_options={"include_usage": True})
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                results["stream_status"] = response.status_code
                async for line in response.aiter_lines():
                    if line:
                        lines.append(line)

        async def queued() -> None:
            results["queued"] = await client.post("/v1/chat/completions", json=chat_body("q"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(streamer)
            await wait_until_async(lambda: len(lines) >= 3, 10, "the stream's first lines")
            tg.start_soon(queued)

            async def read_stats() -> dict[str, Any]:
                stats: dict[str, Any] = (await client.get("/sim/stats")).json()
                return stats

            queued_stats = await wait_until_async(
                read_stats,
                10,
                "the second request queued behind the stream",
                until=lambda stats: stats["waiting"] >= 1,
            )
            assert (queued_stats["inflight"], queued_stats["streaming"]) == (2, 1)
            assert (await client.post("/sleep?level=1", headers=JSON)).status_code == 200
        stats = (await client.get("/sim/stats")).json()

    assert results["stream_status"] == 200
    assert lines[-1] == "data: [DONE]"
    chunks = _data_lines(lines)
    finishes = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    assert finishes[-1] == "abort" and set(finishes[:-1]) == {None}
    assert chunks[-1]["usage"]["completion_tokens"] == len(finishes) - 1 < 500
    queued_response = results["queued"]
    assert queued_response.status_code == 200
    assert queued_response.json()["choices"][0]["finish_reason"] == "abort"
    assert queued_response.json()["usage"]["completion_tokens"] == 0
    ended = ("aborted", "inflight", "streaming", "running")
    assert [stats[k] for k in ended] == [2, 0, 0, 0], stats


def test_client_disconnect_aborts_the_request(start_sim: Any) -> None:
    node = start_sim("--ttft-ms", "5", "--tpot-ms", "20", "--output-tokens", "500")
    with httpx2.Client(base_url=node.url) as client:
        body = chat_body(stream=True)
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i >= 2:
                    break
        stats = wait_until(
            lambda: client.get("/sim/stats").json(),
            5,
            "the aborted request to leave the node",
            until=lambda stats: stats["inflight"] == 0,
        )
    assert (stats["aborted"], stats["completed"]) == (1, 0)
    assert stats["completion_tokens"] < 500


def test_health_lags_sleep_then_catches_up(start_sim: Any) -> None:
    node = start_sim("--fast", "--health-poll-interval", "1.0")
    with httpx2.Client(base_url=node.url) as client:
        assert client.get("/health").json()["status"] == "healthy"
        assert client.post("/sleep", headers=JSON).status_code == 200
        assert client.get("/is_sleeping").json() == {"is_sleeping": True}
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 503
        assert client.get("/health").json()["status"] == "healthy"  # the cached snapshot
        health = wait_until(
            lambda: client.get("/health"),
            5,
            "/health to catch up with the sleep",
            until=lambda health: health.json()["status"] == "sleeping",
        )
        assert health.status_code == 200


def test_api_keys_with_real_clients(start_sim: Any) -> None:
    node = start_sim("--fast", "--api-keys", "secret", "other")
    bad = openai.OpenAI(base_url=node.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=node.url + "/v1", api_key="other", max_retries=0)
    assert good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert httpx2.get(node.url + "/health").status_code == 200
    sleep = httpx2.post(node.url + "/sleep", headers=JSON)
    assert (sleep.status_code, sleep.json()["message"]) == (401, "Unauthorized.")


def test_crash_after_n_requests_exits_hard(start_sim: Any) -> None:
    node = start_sim("--fast", "--crash-after", "2")
    with httpx2.Client(base_url=node.url) as client:
        for _ in range(2):
            assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        with pytest.raises(httpx2.TransportError):
            client.post("/v1/chat/completions", json=chat_body())
    assert node.process.wait(timeout=5) == 3


def test_drop_stream_mid_way_without_done(start_sim: Any) -> None:
    node = start_sim("--fast", "--drop-stream-after", "2")
    lines: list[str] = []
    with (
        pytest.raises(httpx2.TransportError),
        httpx2.stream(
            "POST", node.url + "/v1/chat/completions", json=chat_body(stream=True)
        ) as response,
    ):
        assert response.status_code == 200
        lines.extend(line for line in response.iter_lines() if line)
    assert len(lines) == 2 and "data: [DONE]" not in lines
    # Non-streaming requests are unaffected and the node stays up.
    assert httpx2.post(node.url + "/v1/chat/completions", json=chat_body()).status_code == 200


def test_hang_inference_and_health(start_sim: Any) -> None:
    node = start_sim("--fast", "--hang")
    with httpx2.Client(base_url=node.url, timeout=0.3) as client:
        with pytest.raises(httpx2.ReadTimeout):
            client.post("/v1/chat/completions", json=chat_body())
        assert client.get("/health").status_code == 200
        client.post("/sim/faults", json={"hang": False, "hang_health": True})
        with pytest.raises(httpx2.ReadTimeout):
            client.get("/health")
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_slower_node_finishes_later(start_sim: Any) -> None:
    args = ("--ttft-ms", "20", "--tpot-ms", "10", "--output-tokens", "10")
    fast = start_sim(*args)
    slow = start_sim(*args, "--speed", "0.333")
    finished: list[str] = []

    async def one(name: str, url: str) -> None:
        async with httpx2.AsyncClient() as client:
            response = await client.post(url + "/v1/chat/completions", json=chat_body())
            assert response.status_code == 200
            finished.append(name)

    async def both() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "slow", slow.url)
            tg.start_soon(one, "fast", fast.url)

    anyio.run(both)
    assert finished == ["fast", "slow"]


def test_terminate_by_client_and_sigterm(start_sim: Any) -> None:
    node = start_sim("--fast", "--allow-terminate-by-client")
    assert httpx2.get(node.url + "/terminate").status_code == 200
    # uvicorn shuts down cleanly, then re-raises the signal it caught.
    assert node.process.wait(timeout=10) in (0, -signal.SIGTERM)
    other = start_sim("--fast")
    os.kill(other.process.pid, signal.SIGINT)
    assert other.process.wait(timeout=10) in (0, -signal.SIGINT)


class _Proxy(BaseHTTPRequestHandler):
    """A stand-in proxy: records /nodes/add and whether the node's port was open then."""

    records: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        port = int(body["url"].rsplit(":", 1)[1])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            port_open = True
        except OSError:
            port_open = False
        self.records.append({"path": self.path, "body": body, "port_open": port_open})
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    records: list[dict[str, Any]] = []
    handler = type("Handler", (_Proxy,), {"records": records})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", records
    server.shutdown()
    server.server_close()


def test_proxy_registration_happens_once_before_the_port_opens(
    start_sim: Any, proxy: tuple[str, list[dict[str, Any]]]
) -> None:
    url, records = proxy
    node = start_sim("--fast", "--proxy-url", url, "--role", "prefill", "--startup-delay", "0.3")
    assert records == [
        {
            "path": "/nodes/add",
            "body": {"url": node.url, "status": {"models": [MODEL], "role": 2}},
            "port_open": False,
        }
    ]
    assert httpx2.get(node.url + "/health").status_code == 200


def test_unreachable_proxy_does_not_stop_the_node(start_sim: Any) -> None:
    node = start_sim("--fast", "--proxy-url", f"http://127.0.0.1:{free_port()}")
    assert httpx2.get(node.url + "/health").json()["status"] == "healthy"


def test_startup_delay_keeps_the_port_closed(tmp_path: Any) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "lmfleet.sim", "--port", str(port), "--fast"]
    log = tmp_path / "sim.log"
    proc = ManagedProcess([*argv, "--startup-delay", "2", "--log-level", "info"], log_path=log)
    try:
        # uvicorn logs this once the app is loaded, just before the lifespan's delay: from
        # here on a closed port is the delay's doing, not a slow interpreter start.
        wait_until(
            lambda: log.read_text(errors="replace"),
            30,
            "uvicorn to start the app's lifespan",
            until=lambda text: "Waiting for application startup" in text,
        )
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        assert proc.returncode is None
        assert "Application startup complete" not in log.read_text(errors="replace")
        wait_for_port("127.0.0.1", port, timeout=10, proc=proc)
        assert "Application startup complete" in log.read_text(errors="replace")
    finally:
        proc.terminate(grace=3.0)


def test_lmfleet_cli_entry_point(tmp_path: Any) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "lmfleet.cli", "sim", "--port", str(port), "--fast"]
    proc = ManagedProcess([*argv, "--model", "m"], log_path=tmp_path / "sim.log")
    try:
        wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
        models = httpx2.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["m"]
    finally:
        proc.terminate(grace=3.0)
