"""Fewest requests in flight wins; ties rotate.

In-flight counts end when a response *stream* closes, so long SSE generations
count for their whole life, which is what makes this the sane default for LLMs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from lmfleet.node.state import NodeState
from lmfleet.routing._rotation import UrlRotation
from lmfleet.routing.base import BaseStrategy, RequestInfo


class LeastConnections(BaseStrategy):
    """Pick a node with the minimum `inflight`.

    Why ties rotate instead of going to the first tied node: at low concurrency
    every node is at 0 most of the time, so "first minimum" would send *all*
    traffic to one node (the others never warm up, and a node that recovers
    from `unhealthy` would never be chosen while it ties with an older one).
    Rotating through the tied nodes in URL order spreads ties exactly evenly.
    """

    name: ClassVar[str] = "least_connections"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        # `rng` is accepted for a uniform factory signature; ties rotate, not roll.
        self._rotation = UrlRotation()

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        loads = [node.inflight for node in nodes]
        low = min(loads)
        if loads.count(low) == 1:
            return nodes[loads.index(low)]
        return self._rotation.next(nodes, loads, low)
