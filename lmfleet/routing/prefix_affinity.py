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

*Many nodes*: the mean costs a score of every candidate (about 0.2 µs each, under
the registry's lock), and the walk usually ends at the first or second node. Above
`MEAN_EVERY_ABOVE` candidates the mean (and the cost basis, `cost_basis`) is kept
for one pick per `NODES_PER_PICK` candidates or `MEAN_SECONDS`, whichever ends
first, and only the nodes the walk visits are scored, each fresh. A request leased
or released moves the mean by one request's cost over the number of nodes, so a
kept mean moves by at most 1/8 of a request's cost per lease and release a pick
(64 picks over 512 nodes): a bound as good as the exact one. A walk that meets
`MEAN_STALE_AFTER` nodes over a kept bound (a hot key's, whose first nodes are
full, or a mean gone stale) scores every node, takes the mean anew and walks again
as the exact pick does: it ends as surely, and costs what the exact pick costs,
not a node's score per step of a long walk. The node list the registry hands over
is the same object between leases (its kept eligibility, one per request shape):
each list's URL index and mean are kept by its identity, checked against the node
picked.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from lmfleet.node.state import NodeState
from lmfleet.plain_errors import ConfigError
from lmfleet.routing._ring import HashRing
from lmfleet.routing.base import BaseStrategy, Candidate, RequestInfo
from lmfleet.routing.least_load import SAMPLE_ABOVE, LeastLoad, cost_basis, expected_waits

_MAX_INDEXES = 64
"""Node-set indexes kept (one per model subset / failover subset seen)."""
MEAN_EVERY_ABOVE = SAMPLE_ABOVE
"""Up to this many candidates every keyed pick takes the exact mean."""
NODES_PER_PICK = 8
"""One mean serves a keyed pick per this many candidates, at most (over more than
`MEAN_EVERY_ABOVE`), so that it moves by no more than 1/8 of a request's cost per
lease or release a pick before it is taken anew."""
MEAN_SECONDS = 0.05
"""Seconds one mean serves, at most: the nodes' reports and latencies move it too."""
_MAX_LISTED = 8
"""Node lists (request shapes) whose index and mean are kept at once."""
MEAN_STALE_AFTER = 4
"""Nodes over the bound a walk meets before it takes the mean anew."""


@dataclass(slots=True, eq=False)
class _Listed:
    """One node list's URL index and kept mean (`PrefixAffinity._pick_many`)."""

    nodes: Sequence[NodeState]
    index: dict[str, int]
    basis: tuple[str, float] = ("latency", 1.0)
    limit: float = 0.0
    taken: float = -math.inf
    """When the mean was taken (the clock's time)."""
    left: int = 0
    """Picks the kept mean still serves."""


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
        mean_every_above: float = MEAN_EVERY_ABOVE,
    ) -> None:
        """`mean_every_above`: up to this many candidates a keyed pick takes the
        exact mean (`math.inf`: always)."""
        if not load_factor >= 1.0:
            raise ConfigError(f"load_factor must be >= 1.0, got {load_factor!r}")
        if vnodes < 1:
            raise ConfigError(f"vnodes must be >= 1, got {vnodes!r}")
        if not mean_every_above >= 0:
            raise ConfigError(f"mean_every_above must be >= 0, got {mean_every_above!r}")
        self.load_factor = load_factor
        self._ring = HashRing(vnodes)
        self._indexes: dict[tuple[str, ...], dict[str, int]] = {}
        self._clock = clock
        self._mean_every_above = mean_every_above
        self._fallback = LeastLoad(rng=rng, clock=clock)
        self._listed: dict[int, _Listed] = {}
        """The node lists keyed picks over many nodes saw lately, by identity (one per
        request shape the registry keeps: a model, a version ask), each with its URL
        index and its kept mean. Each entry holds its list, so no other list can have
        its id meanwhile."""

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        key = request.affinity_key
        if key is None:
            return self._fallback.pick(nodes, request)
        if len(nodes) > self._mean_every_above:
            return self._pick_many(nodes, request, key)
        urls = tuple([node.url for node in nodes])
        index = self._indexes.get(urls)
        if index is None:
            index = self._index(urls)
        chosen = self._walk(nodes, key, index, *self._bound(nodes))
        return chosen or self._fallback.pick(nodes, request)  # None: see module docstring

    def _walk(
        self,
        nodes: Sequence[NodeState],
        key: str,
        index: dict[str, int],
        waits: list[float],
        limit: float,
    ) -> NodeState | None:
        """The first node on the key's walk within the bound (every node scored); None
        is unreachable (the least expected wait is within the bound)."""
        for url in self._ring.walk(key):
            position = index.get(url)
            if position is not None and waits[position] <= limit:
                return nodes[position]
        return None

    def _pick_many(
        self, nodes: Sequence[NodeState], request: RequestInfo, key: str
    ) -> NodeState | None:
        """A keyed pick over many nodes: with the kept mean, scoring the nodes the walk
        visits; with a mean taken now (every node scored), when none is kept or the
        walk met `MEAN_STALE_AFTER` nodes over the kept bound."""
        listed = self._listed_for(nodes)
        index = listed.index
        now = self._clock()
        if listed.left > 0 and now - listed.taken < MEAN_SECONDS:
            listed.left -= 1
            basis, limit = listed.basis, listed.limit
            over = 0
            for url in self._ring.walk(key):
                position = index.get(url)
                if position is None:
                    continue
                node = nodes[position]
                if node.url != url:  # the list changed under its index: not the registry's
                    del self._listed[id(nodes)]
                    return self._pick_many(nodes, request, key)
                if expected_waits([node], now, basis)[0][0] <= limit:
                    return node
                over += 1
                if over >= MEAN_STALE_AFTER:
                    break  # a hot key's walk, or a stale mean: every node scored
        basis = cost_basis(nodes)
        waits, limit = self._bound(nodes, basis)
        listed.basis, listed.limit = basis, limit
        listed.taken, listed.left = now, len(nodes) // NODES_PER_PICK - 1
        return self._walk(nodes, key, index, waits, limit) or self._fallback.pick(nodes, request)

    def _listed_for(self, nodes: Sequence[NodeState]) -> _Listed:
        listed = self._listed.get(id(nodes))
        if listed is not None and listed.nodes is nodes and len(listed.index) == len(nodes):
            return listed
        urls = tuple([node.url for node in nodes])
        index = self._indexes.get(urls) or self._index(urls)
        if len(self._listed) >= _MAX_LISTED:
            self._listed.clear()
        listed = self._listed[id(nodes)] = _Listed(nodes, index)
        return listed

    def explain_note(self, nodes: Sequence[NodeState], request: RequestInfo) -> str:
        # Without a key the pick is least_load's, sampled over many nodes like its own.
        key = request.affinity_key
        if key is None:
            return self._fallback.explain_note(nodes, request)
        if len(nodes) > self._mean_every_above:
            return (
                f"over {len(nodes)} candidates a pick's bound is a mean up to "
                f"{len(nodes) // NODES_PER_PICK} "
                f"picks or {MEAN_SECONDS * 1000:g} ms old (the one here is taken now)"
            )
        return ""

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

    def _bound(
        self, nodes: Sequence[NodeState], basis: tuple[str, float] | None = None
    ) -> tuple[list[float], float]:
        """Each node's expected wait and the most a node may have and keep its keys."""
        waits = [wait for wait, _ in expected_waits(nodes, self._clock(), basis)]
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
