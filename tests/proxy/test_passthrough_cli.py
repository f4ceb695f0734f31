"""Bodies pass through byte for byte; `lmfleet serve` runs and stops cleanly as a process."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import uvicorn
from support import StartSim, chat, sim_stats

from lmfleet import LMFleet
from lmfleet.launch.process import ManagedProcess, free_port, wait_for_port
from lmfleet.proxy import ProxyServer

Served = tuple[LMFleet, ProxyServer]
FAST = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")
MODEL = "internlm/internlm2_5-7b-chat"


class Recorder:
    """A tiny upstream that records what it receives (LMDeploy-shaped answers)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes, dict[str, str]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        if path == "/health":
            answer: Any = {"status": "healthy", "message": ""}
        elif path == "/v1/models":
            answer = {"object": "list", "data": [{"id": "rec", "object": "model"}]}
        else:
            self.requests.append((path, body, headers))
            answer = {"id": "x", "object": "chat.completion", "choices": []}
        data = json.dumps(answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data})


@pytest.fixture
def recorder() -> Iterator[tuple[str, Recorder]]:
    app = Recorder()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port("127.0.0.1", port, timeout=10)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=10)


def test_lmdeploy_fields_pass_through_untouched(
    serve_fleet: Callable[..., Served], recorder: tuple[str, Recorder]
) -> None:
    url, app = recorder
    _, server = serve_fleet([url], serve={"api_keys": ["client-key"]}, api_key="node-key")
    raw = (
        b'{"model": "rec", "messages": [{"role": "user", "content": "hi"}], "top_k": 40,'
        b' "session_id": 7, "repetition_penalty": 1.05, "ignore_eos": true,  "stream": false}'
    )
    headers = {
        "content-type": "application/json",
        "authorization": "Bearer client-key",
        "x-custom": "kept",
        "connection": "keep-alive",
    }
    response = httpx2.post(server.url + "/v1/chat/completions?x=1", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    path, body, got = app.requests[-1]
    assert path == "/v1/chat/completions"
    assert body == raw
    assert got["x-custom"] == "kept"
    assert got["authorization"] == "Bearer node-key"  # the node's key, never the client's
    assert got["content-length"] == str(len(raw))


def test_cli_serve_subprocess(start_sim: StartSim, tmp_path: Path) -> None:
    node_key = "cli-node-key-99"
    node = start_sim(*FAST, "--api-keys", node_key)
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "lmfleet.cli",
        "serve",
        "--node",
        node.url,
        "--port",
        str(port),
        "--strategy",
        "round_robin",
        "--health-interval",
        "0.2",
        "--node-api-key",
        node_key,
        "--api-keys",
        "k",
        "--log-level",
        "DEBUG",
    ]
    log = tmp_path / "proxy.log"
    proc = ManagedProcess(argv, log_path=log)
    try:
        wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=3)
        assert chat(client, MODEL, "via cli", max_tokens=2).choices[0].message.content
        assert sim_stats(node.url, node_key)["completed"] == 1
        status = httpx2.get(url + "/nodes/status", headers={"authorization": "Bearer k"}).text
        assert node_key not in status
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.log_tail()
    finally:
        proc.terminate(grace=3.0)
    assert node_key not in log.read_text()
