"""The examples/ scripts that need no GPU, run as their readers run them: the
README points to them, so a change that breaks one must fail here."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx2
import openai
from support import wait_until

from lmfleet.launch.process import free_port

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_attach_routes_six_requests_over_two_simulated_nodes() -> None:
    out = _run("attach.py")
    assert re.search(r"^5 +\S", out, re.M), out  # the sixth answer
    assert "LMFleet: 2/2 healthy" in out


def test_the_async_app_answers_every_question() -> None:
    out = _run("async_app.py")
    served = [int(n) for n in re.findall(r"^http://\S+\s+healthy\s+.*?\s(\d+)\s+0\s+0/", out, re.M)]
    assert len(served) == 3 and sum(served) > 0, out


def test_serve_proxy_serves_until_ctrl_c() -> None:
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "serve_proxy.py"), "--simulate", "2", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx2.get(base + "/readiness", timeout=2).status_code == 200
            except httpx2.TransportError:
                return False

        wait_until(ready, 60, "the example's proxy ready")
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.choices[0].message.content
        proxy.send_signal(signal.SIGINT)
        assert proxy.wait(30) == 0
    finally:
        if proxy.poll() is None:
            proxy.kill()
            proxy.wait()
