"""Fixtures: 2 prefill + 2 decode `lmfleet sim` processes (separate processes, real HTTP)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from distserve.pd_support import FAST, PD, ROLES
from support import StartSim

from lmfleet.launch.process import wait_for_port


@pytest.fixture
def start_pd(start_sim: StartSim) -> Callable[..., PD]:
    """`start_pd(extra_per_node={index: [...]})`: the four role nodes, all ready to serve."""

    def start(extra: dict[int, tuple[str, ...]] | None = None) -> PD:
        extra = extra or {}
        nodes = [
            start_sim(*FAST, "--role", role, *extra.get(i, ()), wait=False)
            for i, role in enumerate(ROLES)
        ]
        for node in nodes:
            wait_for_port("127.0.0.1", node.port, timeout=30, proc=node.process)
        return PD([n.url for n in nodes], list(ROLES))

    return start
