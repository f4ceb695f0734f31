"""Session fixtures: one real LMDeploy peer and one `lmfleet sim`, configured alike.

Both are started once per session (the peer's import of torch and transformers
takes several seconds on two cores), with an API key, `/health` polled every
`POLL_INTERVAL` seconds and `--proxy-url` pointing at a capturing stand-in proxy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from conformance.peer_support import (
    API_KEY,
    CaptureProxy,
    Server,
    capture_proxy,
    make_model,
    peer_unavailable,
    start_peer,
    start_sim,
    wait_for_port,
)


@dataclass
class Pair:
    """The real server and the simulator, plus what they registered."""

    real: Server
    sim: Server
    model: str
    proxy: CaptureProxy

    def servers(self) -> list[Server]:
        return [self.real, self.sim]


@pytest.fixture(scope="session")
def peer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = peer_unavailable()
    if reason:
        pytest.skip(reason)
    return make_model(tmp_path_factory.mktemp("peer-model") / "tiny-llama")


@pytest.fixture(scope="session")
def pair(peer_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    logs = tmp_path_factory.mktemp("conformance-logs")
    proxy = capture_proxy()
    common = ("--api-keys", API_KEY, "--proxy-url", proxy.url)
    real = start_peer(peer_model, logs, *common, wait=False)
    sim = start_sim(peer_model, logs, *common, "--enable-metrics", wait=False)
    try:
        wait_for_port("127.0.0.1", sim.port, timeout=30, proc=sim.process)
        wait_for_port("127.0.0.1", real.port, timeout=120, proc=real.process)
        for server in (real, sim):  # until the first health snapshot is in
            for _ in range(100):
                if httpx2.get(server.url + "/health", timeout=5).status_code == 200:
                    break
        yield Pair(real, sim, str(peer_model), proxy)
    finally:
        real.stop()
        sim.stop()
        proxy.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
