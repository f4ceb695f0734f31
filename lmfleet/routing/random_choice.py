"""Uniform random choice: no state, no feedback, the baseline every other beats."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from lmfleet.node.state import NodeState
from lmfleet.routing.base import BaseStrategy, RequestInfo


class RandomStrategy(BaseStrategy):
    """Pick any eligible node with equal probability (LMDeploy's `random`)."""

    name: ClassVar[str] = "random"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        return self._rng.choice(nodes)
