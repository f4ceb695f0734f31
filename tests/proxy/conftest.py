"""Fixtures for the proxy: fleets over real `lmfleet sim` processes, served by real uvicorn."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from support import StartSim

from lmfleet import LMFleet
from lmfleet.proxy import ProxyServer

FAST = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")

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
        fleet = LMFleet.attach(urls, **kwargs)  # type: ignore[arg-type]
        fleets.append(fleet)
        if urls and ready != 0:
            fleet.wait_ready(timeout=30, min_ready=ready or len(urls))
        server = fleet.serve(port=0, **(serve or {}))  # type: ignore[arg-type]
        return fleet, server

    yield make
    for fleet in fleets:
        fleet.close()


@pytest.fixture
def two_nodes(start_sim: StartSim) -> list[str]:
    return [start_sim(*FAST).url for _ in range(2)]
