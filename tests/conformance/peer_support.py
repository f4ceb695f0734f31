"""Start the real LMDeploy api_server (stub engine) and `lmfleet sim` side by side.

The peer runs under `.venv-peer/bin/python` (see peer/setup_peer.sh); when that
venv is missing or broken every test that needs it skips, naming what failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from support import wait_until

from lmfleet.launch.process import ManagedProcess, free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
PEER_DIR = Path(__file__).resolve().parent / "peer"
PEER_VENV = Path(os.environ.get("PEER_VENV", REPO / ".venv-peer"))
PEER_PYTHON = PEER_VENV / "bin" / "python"
API_KEY = "sk-conformance"
POLL_INTERVAL = 1.0  # LMDEPLOY_HEALTH_POLL_INTERVAL for both servers
START_TIMEOUT = 120.0


def peer_unavailable() -> str | None:
    """Why the peer cannot run here, or None when it can."""
    failed = PEER_VENV.with_name(PEER_VENV.name + ".failed")
    if failed.exists():
        return f"real LMDeploy peer unavailable: {failed.read_text().strip()}"
    if not PEER_PYTHON.exists():
        return (
            f"real LMDeploy peer not installed: {PEER_VENV} is missing "
            "(run `make peer` or tests/conformance/peer/setup_peer.sh)"
        )
    if not (PEER_VENV / ".peer-stamp").exists():
        return (
            f"real LMDeploy peer not installed: {PEER_VENV} has no .peer-stamp "
            "(set-up did not finish)"
        )
    probe = subprocess.run(
        [str(PEER_PYTHON), "-c", "import lmdeploy.serve.openai.api_server"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        tail = probe.stderr.strip().splitlines()[-1:] or ["?"]
        return (
            f"real LMDeploy peer broken: import lmdeploy.serve.openai.api_server failed: {tail[0]}"
        )
    return None


def make_model(folder: Path) -> Path:
    """The tiny weightless model folder (peer/make_model.py, run by the peer's python)."""
    subprocess.run([str(PEER_PYTHON), str(PEER_DIR / "make_model.py"), str(folder)], check=True)
    return folder


@dataclass
class Server:
    url: str
    port: int
    process: ManagedProcess
    kind: str  # "real" or "sim"

    def stop(self) -> None:
        self.process.terminate(grace=5.0)


def peer_env(poll_interval: float | None, token_interval: float) -> dict[str, str]:
    """Overrides on top of os.environ; `poll_interval` None keeps LMDeploy's 12 s."""
    env = {"STUB_TOKEN_INTERVAL": str(token_interval), "UVICORN_LOG_LEVEL": "warning"}
    interval = 12.0 if poll_interval is None else poll_interval
    env["LMDEPLOY_HEALTH_POLL_INTERVAL"] = str(interval)
    env["LMDEPLOY_HEALTH_PROBE_TIMEOUT"] = str(min(10.0, interval / 2))
    return env


def start_peer(
    model_dir: Path,
    log_dir: Path,
    *args: str,
    poll_interval: float | None = POLL_INTERVAL,
    token_interval: float = 0.01,
    wait: bool = True,
) -> Server:
    """`lmdeploy serve api_server MODEL --backend pytorch ...` with the stub engine."""
    port = free_port()
    argv = [
        str(PEER_PYTHON),
        str(PEER_DIR / "run_peer.py"),
        "serve",
        "api_server",
        str(model_dir),
        "--backend",
        "pytorch",
        "--server-name",
        "127.0.0.1",
        "--server-port",
        str(port),
        "--max-batch-size",
        "8",  # else LMDeploy asks torch.cuda for the device name
        *args,
    ]
    proc = ManagedProcess(
        argv, log_path=log_dir / f"peer-{port}.log", env=peer_env(poll_interval, token_interval)
    )
    server = Server(f"http://127.0.0.1:{port}", port, proc, "real")
    if wait:
        wait_for_port("127.0.0.1", port, timeout=START_TIMEOUT, proc=proc)
    return server


def start_sim(model_dir: Path, log_dir: Path, *args: str, wait: bool = True) -> Server:
    """`lmfleet sim` configured like the peer (same model name, same poll interval, the
    PyTorch backend with LMDeploy's default executor: uni)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "lmfleet.sim",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        str(model_dir),
        "--health-poll-interval",
        str(POLL_INTERVAL),
        "--backend",
        "pytorch",
        "--ttft-ms",
        "5",
        "--tpot-ms",
        "10",
        *args,
    ]
    proc = ManagedProcess(argv, log_path=log_dir / f"sim-{port}.log")
    server = Server(f"http://127.0.0.1:{port}", port, proc, "sim")
    if wait:
        wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
    return server


@contextlib.contextmanager
def started_pair(
    model_dir: Path, log_dir: Path, *args: str, sim_args: tuple[str, ...] = ()
) -> Iterator[list[Server]]:
    """The peer and a sim started side by side with `args` (the sim also `sim_args`),
    once both ports are open: `[real, sim]`; both stop when the block ends."""
    real = start_peer(model_dir, log_dir, *args, wait=False)
    sim = start_sim(model_dir, log_dir, *args, *sim_args, wait=False)
    try:
        wait_for_port("127.0.0.1", sim.port, timeout=30, proc=sim.process)
        wait_for_port("127.0.0.1", real.port, timeout=120, proc=real.process)
        yield [real, sim]
    finally:
        real.stop()
        sim.stop()


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Registration:
    body: Any
    headers: dict[str, str]
    port_open: bool  # was the registering node already listening?


@dataclass
class CaptureProxy:
    """A stand-in for a proxy: records every `POST /nodes/add` and answers 200."""

    server: ThreadingHTTPServer
    seen: list[Registration] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, port: int, timeout: float = 30.0) -> Registration:
        def from_port(seen: list[Registration]) -> Registration | None:
            for reg in seen:
                if isinstance(reg.body, dict) and str(reg.body.get("url", "")).endswith(f":{port}"):
                    return reg
            return None

        seen = wait_until(
            lambda: list(self.seen), timeout, f"a registration from port {port}", until=from_port
        )
        found = from_port(seen)
        assert found is not None
        return found

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def capture_proxy() -> CaptureProxy:
    seen: list[Registration] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            body = json.loads(raw or b"null")
            url = str(body.get("url", "")) if isinstance(body, dict) else ""
            port = int(url.rsplit(":", 1)[-1]) if url.rsplit(":", 1)[-1].isdigit() else 0
            headers = {k.lower(): v for k, v in self.headers.items()}
            seen.append(Registration(body, headers, port_open(port) if port else False))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return CaptureProxy(server, seen)


def require_peer() -> None:
    reason = peer_unavailable()
    if reason:
        pytest.skip(reason)
