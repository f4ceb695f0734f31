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
    started_pair,
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
    try:
        with started_pair(peer_model, logs, *common, sim_args=("--enable-metrics",)) as servers:
            for server in servers:  # until the first health snapshot is in
                for _ in range(100):
                    if httpx2.get(server.url + "/health", timeout=5).status_code == 200:
                        break
            yield Pair(*servers, str(peer_model), proxy)
    finally:
        proxy.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
