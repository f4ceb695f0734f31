"""Ctrl-C (SIGINT) and SIGTERM end every subcommand quietly with status 0.

Two copies of each command run side by side; one gets SIGINT, the other SIGTERM,
once it says it is up. Launched nodes must end with their command.
"""

from __future__ import annotations

import queue
import re
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import pytest
from cli_support import Console
from support import StartSim, wait_until

from lmfleet.launch.process import free_port

UP = {
    "sim": (["sim", "--fast", "--port", "{port}"], r"lmfleet sim: \S+ on http://127\.0\.0\.1:\d+"),
    "serve": (["serve", "--port", "{port}"], r"lmfleet proxy on http://127\.0\.0\.1:\d+"),
    "launch": (
        ["launch", "m", "--simulate", "--port", "{port}", "--health-interval", "0.2"],
        r"^\s*http://127\.0\.0\.1:(\d+)\s",  # the status table, once the node is ready
    ),
    "demo": (  # signalled in its first burst, with its nodes up
        ["demo", "--nodes", "2", "--requests", "20000"],
        r"^\s*http://127\.0\.0\.1:(\d+)\s",
    ),
}


def refuses(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("command", list(UP))
def test_interrupt_and_terminate_exit_quietly(
    command: str, console: Callable[..., Console]
) -> None:
    args, up = UP[command]
    copies = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        argv = [a.format(port=free_port()) for a in args]
        copies[signum] = console(*argv, env={"PYTHONUNBUFFERED": "1"})
    for signum, copy in copies.items():
        found = copy.wait_for(up, timeout=90)
        node_port = int(found.group(1)) if found.groups() else None
        status = copy.stop(signum)
        output = str(copy)
        assert status == 0, f"{signal.Signals(signum).name}: status {status}\n{output}"
        assert "Traceback" not in output, output
        assert not re.search(r"\bERROR\b", output), output
        if node_port is not None:  # the launched node ended with the command
            wait_until(lambda port=node_port: refuses(port), timeout=10, what="node gone")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_quietly_with_requests_waiting_and_streaming(
    signum: int, console: Callable[..., Console], start_sim: StartSim, tmp_path: Path
) -> None:
    """Streams in progress and requests waiting for a (sleeping) node when the signal
    comes: the waiters get a 503 with Retry-After at once, each stream ends with an
    SSE error event, and the command exits 0 within 3 s, with no traceback."""
    streaming = start_sim("--model", "a", "--health-poll-interval", "0.2", "--tpot-ms", "50")
    sleeping = start_sim("--model", "b", "--health-poll-interval", "0.2")
    port = free_port()
    proxy = f"http://127.0.0.1:{port}"
    serve = console(
        "serve",
        "--port",
        str(port),
        "--node",
        streaming.url,
        "--node",
        sleeping.url,
        "--health-interval",
        "0.2",
        "--wait-for-node",
        "60",
        "--state-dir",
        str(tmp_path),
        env={"PYTHONUNBUFFERED": "1"},
    )
    serve.wait_for(r"lmfleet proxy on ")
    httpx2.post(
        sleeping.url + "/sleep?level=1", headers={"content-type": "application/json"}, timeout=10
    ).raise_for_status()
    wait_until(
        lambda: httpx2.get(proxy + "/nodes/status", timeout=10).json(),
        timeout=20,
        until=lambda nodes: (
            nodes[sleeping.url]["state"] == "sleeping"
            and nodes[streaming.url]["state"] == "healthy"
        ),
    )
    client = openai.OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0)
    first_chunks: queue.Queue[str] = queue.Queue()

    def stream() -> str:
        chunks = client.chat.completions.create(
            model="a",
            messages=[{"role": "user", "content": "a long story"}],
            max_tokens=2000,
            stream=True,
        )
        try:
            for _ in chunks:
                first_chunks.put("chunk")
        except openai.APIError as exc:
            return str(exc)
        return "ended without an error"

    def wait() -> httpx2.Response:
        body = {"model": "b", "messages": [{"role": "user", "content": "waiting"}]}
        return httpx2.post(proxy + "/v1/chat/completions", json=body, timeout=30)

    with ThreadPoolExecutor(5) as pool:
        streams = [pool.submit(stream) for _ in range(2)]
        waiters = [pool.submit(wait) for _ in range(3)]
        for _ in streams:
            first_chunks.get(timeout=20)
        wait_until(
            lambda: httpx2.get(proxy + "/metrics", timeout=10).text,
            timeout=20,
            until=lambda text: "lmfleet_requests_waiting 3.0" in text,
        )
        started = time.monotonic()
        status = serve.stop(signum, timeout=30)
        stopped = time.monotonic() - started
        answers = [w.result(timeout=10) for w in waiters]
        cut = [s.result(timeout=10) for s in streams]
    output = str(serve)
    assert status == 0, output
    assert stopped < 3.0, f"{stopped:.1f} s\n{output}"
    assert "Traceback" not in output, output
    assert not re.search(r"\bERROR\b", output), output
    for answer in answers:
        assert answer.status_code == 503 and "retry-after" in answer.headers, answer.text
        assert "shutting down" in answer.json()["message"]
    assert all("shutting down" in message for message in cut), cut
