"""Shared fixtures: real `lmfleet sim` processes on 127.0.0.1."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import SimNode, StartSim

from lmfleet.launch.process import ManagedProcess, free_port, wait_for_port


@pytest.fixture
def start_sim(tmp_path: Path) -> Iterator[StartSim]:
    """Start `python -m lmfleet.sim --port P [args...]`; every process ends with the test."""
    started: list[SimNode] = []

    def start(*args: str, port: int | None = None, wait: bool = True) -> SimNode:
        port = port or free_port()
        argv = [sys.executable, "-m", "lmfleet.sim", "--host", "127.0.0.1", "--port", str(port)]
        proc = ManagedProcess([*argv, *args], log_path=tmp_path / f"sim-{port}.log")
        node = SimNode(url=f"http://127.0.0.1:{port}", port=port, process=proc)
        started.append(node)
        if wait:
            wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
        return node

    yield start
    for node in started:
        node.process.terminate(grace=3.0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
