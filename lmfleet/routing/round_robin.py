"""Strict rotation: each node in turn, in URL order.

URL order (rather than the order the registry lists nodes) keeps the rotation
stable when nodes come and go; see `_rotation.UrlRotation`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from lmfleet.node.state import NodeState
from lmfleet.routing._rotation import UrlRotation
from lmfleet.routing.base import BaseStrategy, RequestInfo


class RoundRobin(BaseStrategy):
    """Every node gets exactly one request per lap, whatever its load."""

    name: ClassVar[str] = "round_robin"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        # `rng` is accepted for a uniform factory signature; rotation needs none.
        self._rotation = UrlRotation()

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        return self._rotation.next(nodes)
