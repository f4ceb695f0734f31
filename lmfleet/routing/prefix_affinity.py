"""Send requests that share a session or prompt prefix to the same node.

LMDeploy's prefix cache only helps when a conversation's next turn reaches the
node that holds its KV blocks. Consistent hashing on the affinity key (see
`affinity.affinity_key`) gives that, and moves only about 1/n of the keys when a
node joins or leaves. Pure affinity overloads a node that owns a hot key, so the
bound of "consistent hashing with bounded loads" (Mirrokni, Thorup, Zadimoghaddam
2018) applies: a node is skipped, and the walk goes on clockwise, when taking this
request would put it above `ceil(load_factor * (total_inflight + 1) / n)`.

The bound is always reachable: some node carries at most the average load, and
`floor(total / n) + 1 <= ceil((total + 1) / n)`, so the walk always ends.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import ClassVar

from lmfleet.errors import ConfigError
from lmfleet.routing._ring import HashRing
from lmfleet.routing.base import RequestInfo
from lmfleet.routing.least_connections import LeastConnections
from lmfleet.state import NodeState

_MAX_INDEXES = 64
"""Node-set indexes kept (one per model subset / failover subset seen)."""


class PrefixAffinity:
    """Consistent hashing with bounded loads on `request.affinity_key`.

    Requests without a key go to `LeastConnections`.
    """

    name: ClassVar[str] = "prefix_affinity"
    uses_affinity_key: ClassVar[bool] = True

    def __init__(
        self,
        *,
        load_factor: float = 1.25,
        vnodes: int = 100,
        rng: random.Random | None = None,
    ) -> None:
        if not load_factor >= 1.0:
            raise ConfigError(f"load_factor must be >= 1.0, got {load_factor!r}")
        if vnodes < 1:
            raise ConfigError(f"vnodes must be >= 1, got {vnodes!r}")
        self.load_factor = load_factor
        self._ring = HashRing(vnodes)
        self._indexes: dict[tuple[str, ...], dict[str, int]] = {}
        self._fallback = LeastConnections(rng=rng)

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        key = request.affinity_key
        if key is None:
            return self._fallback.pick(nodes, request)
        urls = tuple([node.url for node in nodes])
        index = self._indexes.get(urls)
        if index is None:
            index = self._index(urls)
        limit = math.ceil(
            self.load_factor * (sum([node.inflight for node in nodes]) + 1) / len(nodes)
        )
        for url in self._ring.walk(key):
            position = index.get(url)
            if position is not None and nodes[position].inflight < limit:
                return nodes[position]
        return self._fallback.pick(nodes, request)  # unreachable: see module docstring

    def _index(self, urls: tuple[str, ...]) -> dict[str, int]:
        """URL -> position for this node set; places new URLs on the ring."""
        ring = self._ring
        if not ring.urls.issuperset(urls):
            # A new URL: place it, and forget the URLs absent from this node set
            # once they outnumber the present ones. Dropping an absent URL never
            # changes a pick (it would be skipped), and one that comes back gets
            # the same points again, so pruning only bounds memory.
            live = set(urls)
            stale = ring.urls - live
            ring.rebuild(live if len(stale) > len(live) else ring.urls | live)
        if len(self._indexes) >= _MAX_INDEXES:
            self._indexes.clear()
        index = self._indexes[urls] = {url: i for i, url in enumerate(urls)}
        return index
