"""Fixtures for fault scenarios: a fleet over real sims, reached through either front door."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import openai
import pytest
from loadgen import Door
from support import SimNode, StartSim

from lmfleet import LMFleet

QUICK = ("--health-poll-interval", "0.2", "--ttft-ms", "5", "--tpot-ms", "3")
"""Sim timings for fault tests: a request takes tens of milliseconds."""


@pytest.fixture(params=["client", "proxy"])
def door(request: pytest.FixtureRequest) -> Iterator[Door]:
    """How requests reach the fleet: its own routed client, or a plain client via the proxy."""
    servers = []

    def open_door(
        fleet: LMFleet, *, timeout: float = 10.0, max_retries: int = 2
    ) -> openai.AsyncOpenAI:
        if request.param == "client":
            return fleet.async_client(timeout=timeout, max_retries=max_retries)
        server = fleet.serve(port=0, upstream_timeout=timeout)
        servers.append(server)
        return openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="none", timeout=timeout, max_retries=max_retries
        )

    yield open_door
    for server in servers:
        server.stop()


@pytest.fixture
def fleet_over(start_sim: StartSim) -> Iterator[Callable[..., tuple[LMFleet, list[SimNode]]]]:
    """`fleet_over([args_node1, ...])`: one sim per arg tuple, attached and ready."""
    fleets: list[LMFleet] = []

    def make(node_args: list[tuple[str, ...]], **kwargs: object) -> tuple[LMFleet, list[SimNode]]:
        nodes = [start_sim(*QUICK, *args) for args in node_args]
        urls = [n.url for n in nodes]
        fleet = LMFleet.attach(urls, health_interval=0.2, **kwargs)  # type: ignore[arg-type]
        fleets.append(fleet)
        fleet.wait_ready(timeout=30, min_ready=len(nodes))
        return fleet, nodes

    yield make
    for fleet in fleets:
        fleet.close()
