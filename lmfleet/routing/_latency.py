"""Shared scoring for the latency-aware strategies.

score = latency x (inflight + 1): the time this request would take if the node
served its queue one after another. The `+ 1` counts the request being routed, so
an idle fast node beats an idle slow one (LMDeploy's `unfinished / speed` scores
every idle node 0 and cannot tell them apart), and the `inflight` factor stops the
fastest node from receiving everything: its score grows with each request until a
slower but idle node wins. Exact ties are broken at random.

A node never measured (`latency is None`) gets a prior from the measured ones,
chosen by the subclass. Without any measurement the prior is 1.0 for every node,
which reduces the score to `inflight + 1`: least connections with random ties.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lmfleet.node.state import NodeState
from lmfleet.routing.base import BaseStrategy, RequestInfo


class LatencyScored(BaseStrategy):
    """Lowest `latency x (inflight + 1)`; subclasses choose the prior."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def prior(self, measured: list[float]) -> float:
        """Latency assumed for never-measured nodes; `measured` is never empty."""
        raise NotImplementedError

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        # Plain comprehensions (specialised attribute loads) and C-level min/count:
        # about 4 us at 64 nodes, measured or not (bench/routing_pick.py).
        measured = [node.latency for node in nodes if node.latency is not None]
        assumed = 1.0
        if measured and len(measured) < len(nodes):
            assumed = self.prior(measured)
        scores = [
            (assumed if node.latency is None else node.latency) * (node.inflight + 1)
            for node in nodes
        ]
        best = min(scores)
        position = scores.index(best)
        ties = scores.count(best)
        if ties > 1:  # the k-th tied node, k uniform; list.index stays in C
            for _ in range(self._rng.randrange(ties)):
                position = scores.index(best, position + 1)
        return nodes[position]
