"""Fixtures for the proxy: fleets over real `lmfleet sim` processes, served by real uvicorn."""

from __future__ import annotations

import pytest
from support import StartSim

FAST = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")


@pytest.fixture
def two_nodes(start_sim: StartSim) -> list[str]:
    return [start_sim(*FAST).url for _ in range(2)]
