"""Shared fixtures: real `lmfleet sim` processes on 127.0.0.1."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_support import Console
from hypothesis import HealthCheck, settings
from support import SimNode, StartSim, wait_until

from lmfleet import LMFleet
from lmfleet.errors import LaunchError
from lmfleet.launch.process import ManagedProcess, free_port, wait_for_port
from lmfleet.proxy import ProxyServer

# One hypothesis profile for every property test, sized for a 2-core CI machine shared
# with other jobs: no per-example deadline (a scheduling stall is not a slow test), a
# bounded number of examples, and no `too_slow` health check (it times example
# generation, which a cold start or a loaded CPU slows down; the other checks stay).
settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")


@pytest.fixture
def start_sim(tmp_path: Path) -> Iterator[StartSim]:
    """Start `python -m lmfleet.sim --port P [args...]`; every process ends with the test."""
    started: list[SimNode] = []

    def start(*args: str, port: int | None = None, wait: bool = True) -> SimNode:
        if wait and port is None:
            # The sim binds a port of its own and says which once it listens: a port
            # picked here could be taken by another test's process before the sim binds
            # it (the sim then fails, and the port answers for someone else's node).
            argv = [sys.executable, "-m", "lmfleet.sim", "--host", "127.0.0.1", "--port", "0"]
            log = tmp_path / f"sim-{len(started)}.log"
            proc = ManagedProcess([*argv, *args], log_path=log)
            node = SimNode(url="", port=0, process=proc)
            started.append(node)
            node.url = _announced(proc, log)
            node.port = int(node.url.rsplit(":", 1)[1])
            return node
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


ANNOUNCED = re.compile(r"lmfleet sim: .* on (http://127\.0\.0\.1:\d+)")


def _announced(proc: ManagedProcess, log: Path, timeout: float = 30) -> str:
    """The URL a sim started with `--port 0` prints once it accepts connections."""

    def announced() -> re.Match[str] | None:
        found = ANNOUNCED.search(log.read_text(errors="replace")) if log.exists() else None
        if found is None and proc.returncode is not None:
            raise LaunchError(f"the sim exited with status {proc.returncode}:\n{proc.log_tail()}")
        return found

    found = wait_until(announced, timeout, "the sim announcing its URL")
    assert found is not None
    return found.group(1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


Served = tuple[LMFleet, ProxyServer]


@pytest.fixture
def serve_fleet() -> Iterator[Callable[..., Served]]:
    """`serve_fleet(urls, fleet_kwargs..., serve=dict(...))`: attach, wait, serve on a free port."""
    fleets: list[LMFleet] = []

    def make(
        urls: list[str],
        *,
        serve: dict[str, object] | None = None,
        ready: int | None = None,
        **kwargs: object,
    ) -> Served:
        kwargs.setdefault("health_interval", 0.2)
        # Empty `urls`: a proxy whose nodes register at /nodes/add.
        fleet = LMFleet.attach(urls, allow_empty=True, **kwargs)  # type: ignore[arg-type]
        fleets.append(fleet)
        if urls and ready != 0:
            fleet.wait_ready(timeout=30, min_ready=ready or len(urls))
        server = fleet.serve(port=0, **(serve or {}))  # type: ignore[arg-type]
        return fleet, server

    yield make
    for fleet in fleets:
        fleet.close()


@pytest.fixture
def operator_logging() -> Iterator[None]:
    """`configure_logging("INFO")` as the `lmfleet` commands call it, undone after the
    test: the root's level and handlers and the loggers it changes are process-wide."""
    from lmfleet.logs import QUIET_LOGGERS, UVICORN_LOGGERS, configure_logging

    root = logging.getLogger()
    touched = [logging.getLogger(name) for name in (*QUIET_LOGGERS, *UVICORN_LOGGERS)]
    saved = [(lg, lg.level, lg.propagate, list(lg.handlers)) for lg in [root, *touched]]
    configure_logging("INFO")
    yield
    for logger, level, propagate, handlers in saved:
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers


@pytest.fixture(autouse=True)
def private_state_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test's own XDG state directory: `lmfleet serve` keeps its node list there
    by default, and a test must neither write into the user's home nor reload nodes
    another test's proxy left behind on a port it happens to reuse."""
    state = tmp_path_factory.mktemp("xdg-state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs two workers), keep each test file on one
    worker, so a module's fixtures start once, and the conformance files together:
    they share one real LMDeploy peer per session, which is slow to start."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        group = "conformance" if path.startswith("tests/conformance/") else path
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def console() -> Iterator[Callable[..., Console]]:
    """Start `lmfleet` commands (tests/cli_support.py); each one still running at the
    end is killed."""
    started: list[Console] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Console:
        started.append(Console(*args, env=env))
        return started[-1]

    yield start
    for one in started:
        one.kill()
