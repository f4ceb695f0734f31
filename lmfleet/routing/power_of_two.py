"""Power of two choices: sample two nodes, keep the less loaded.

Nearly as even as least connections, but each pick looks at two nodes only and
never herds: many clients routing at once with stale in-flight counts do not all
pick the same "least loaded" node (Mitzenmacher, "The Power of Two Choices").
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from lmfleet.node.state import NodeState
from lmfleet.routing.base import BaseStrategy, RequestInfo


class PowerOfTwo(BaseStrategy):
    """Fewer `inflight` of two distinct random nodes; tie: lower latency, then random."""

    name: ClassVar[str] = "power_of_two"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        count = len(nodes)
        if count == 1:
            return nodes[0]
        randrange = self._rng.randrange
        i = randrange(count)
        j = randrange(count - 1)
        if j >= i:  # two distinct indices, each pair equally likely, in random order
            j += 1
        a, b = nodes[i], nodes[j]
        if a.inflight != b.inflight:
            return a if a.inflight < b.inflight else b
        # Never measured counts as fastest: a new node gets traffic, and so a latency.
        la = 0.0 if a.latency is None else a.latency
        lb = 0.0 if b.latency is None else b.latency
        if la != lb:
            return a if la < lb else b
        # The pair's order is already random, so `a` is a fair coin flip.
        return a
