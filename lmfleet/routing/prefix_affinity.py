"""Send requests that share a session or prompt prefix to the same node, within a load bound.

LMDeploy's prefix cache only helps when a conversation's next turn reaches the
node that holds its KV blocks. Consistent hashing on the affinity key (see
`affinity.affinity_key`) gives that, and moves only about 1/n of the keys when a
node joins or leaves. Pure affinity overloads a node that owns a hot key, so the
walk goes on clockwise past a node that is too busy, as in "consistent hashing
with bounded loads" (Mirrokni, Thorup, Zadimoghaddam 2018), and as SGLang's
cache-aware policy leaves its cache match for the shortest queue once the
imbalance passes a threshold.

"Too busy" is judged with `least_load`'s estimate, in seconds, counting every
client's requests (the node's own `/metrics`) and each node's recent latency: a
node is skipped when one more request there is expected to take more than
`load_factor` times the mean over the candidates. A node three times slower, or
one another client keeps busy, yields its keys sooner than a count of this
process's requests would show.

The bound is always reachable: the candidate with the least expected wait is at
or below the mean, so the walk always ends. Requests without a key go to
`least_load`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

from lmfleet.node.state import NodeState
from lmfleet.plain_errors import ConfigError
from lmfleet.routing._ring import HashRing
from lmfleet.routing.base import BaseStrategy, Candidate, RequestInfo
from lmfleet.routing.least_load import LeastLoad, expected_waits

_MAX_INDEXES = 64
"""Node-set indexes kept (one per model subset / failover subset seen)."""


class PrefixAffinity(BaseStrategy):
    """Consistent hashing on `request.affinity_key`, bounded by the expected wait.

    Requests without a key go to `LeastLoad`.
    """

    name: ClassVar[str] = "prefix_affinity"
    uses_affinity_key: ClassVar[bool] = True
    uses_node_load: ClassVar[bool] = True
    """Other clients' requests count toward the bound (the monitor reads `/metrics`)."""

    def __init__(
        self,
        *,
        load_factor: float = 1.25,
        vnodes: int = 100,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not load_factor >= 1.0:
            raise ConfigError(f"load_factor must be >= 1.0, got {load_factor!r}")
        if vnodes < 1:
            raise ConfigError(f"vnodes must be >= 1, got {vnodes!r}")
        self.load_factor = load_factor
        self._ring = HashRing(vnodes)
        self._indexes: dict[tuple[str, ...], dict[str, int]] = {}
        self._clock = clock
        self._fallback = LeastLoad(rng=rng, clock=clock)

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        key = request.affinity_key
        if key is None:
            return self._fallback.pick(nodes, request)
        urls = tuple([node.url for node in nodes])
        index = self._indexes.get(urls)
        if index is None:
            index = self._index(urls)
        waits, limit = self._bound(nodes)
        for url in self._ring.walk(key):
            position = index.get(url)
            if position is not None and waits[position] <= limit:
                return nodes[position]
        return self._fallback.pick(nodes, request)  # unreachable: see module docstring

    def explain_note(self, nodes: Sequence[NodeState], request: RequestInfo) -> str:
        # Without a key the pick is least_load's, sampled over many nodes like its own.
        key = request.affinity_key
        return self._fallback.explain_note(nodes, request) if key is None else ""

    def explain(self, nodes: Sequence[NodeState], request: RequestInfo) -> list[Candidate]:
        """Each node's expected wait, its place in this key's walk and the bound."""
        key = request.affinity_key
        if key is None:
            return [
                Candidate(c.url, c.score, f"no affinity key, least_load: {c.why}")
                for c in self._fallback.explain(nodes, request)
            ]
        urls = tuple([node.url for node in nodes])
        if urls not in self._indexes:
            self._index(urls)  # places URLs new to the ring
        waits, limit = self._bound(nodes)
        present = {node.url for node in nodes}
        rank: dict[str, int] = {}
        for url in self._ring.walk(key):  # first visits only: the ring repeats owners
            if url in present and url not in rank:
                rank[url] = len(rank)
        candidates = []
        for node, wait in zip(nodes, waits, strict=True):
            verdict = "within" if wait <= limit else "over"
            why = (
                f"#{rank.get(node.url, len(rank)) + 1} in this key's ring walk; "
                f"expected {wait:.3g} s, {verdict} the bound {limit:.3g} s"
            )
            candidates.append(Candidate(node.url, wait, why))
        return candidates

    def _bound(self, nodes: Sequence[NodeState]) -> tuple[list[float], float]:
        """Each node's expected wait and the most a node may have and keep its keys."""
        waits = [wait for wait, _ in expected_waits(nodes, self._clock())]
        mean = math.fsum(waits) / len(waits)
        return waits, self.load_factor * mean * (1.0 + 1e-9)  # the 1e-9 absorbs rounding

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
