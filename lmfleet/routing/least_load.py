"""The node where one more request is expected to take the least time, counting every client.

`least_connections` counts only this process's requests, and counts them alike on
a fast node and a slow one. `least_load` scores a node in time:

    (requests on the node + 1 + 0.75 x those beyond its batch) x what one request costs there

- *Requests on the node* (`NodeState.held`) = ours in flight now, plus our peers'
  (the other workers of one `lmfleet serve`, or replicas sharing a store: each
  shares its counts within milliseconds, lmfleet/proxy/shared.py), plus what other
  clients had there by the node's own latest `/metrics` report (`NodeLoad.others`:
  the report minus ours and our peers' at the time of the read, so none is counted
  twice; it fades once older than a health interval, so a node that stops
  reporting falls back to what we know).
- *What one request costs* (`expected_waits`), from the first source every
  candidate has: 1 / the speed the operator gave (`attach(speeds=)`,
  `add_node(speed=)`, LMDeploy's `status.speed` at `/nodes/add`); the node's decode
  pace from its own counters (`NodeLoad.pace`, seconds per token per sequence in its
  batch: its speed as it runs now, without its queue); else the EWMA of our
  requests' latency there (a node not measured yet gets the fastest measured
  candidate's, so that new nodes get traffic; none measured: "fewest requests on
  the node, all clients").

Measured (docs/benchmarks.md §3, one client at 95 % load, nodes of speed 1, 1 and
1/3, p99 over the replayed reference): latency EWMA 1.63, its lower quartile 1.70,
the exact speeds 1.36, the decode pace 1.31. Latency is a biased speed: it includes
a busy fast node's queue. Dividing it by the requests the node held was worse still
(a batch's latency is flat until it fills, so busy nodes looked faster).

*Beyond its batch*: a batching engine runs up to its capacity at once
(`NodeState.capacity`, learned from the node's `/metrics` the first time its engine
showed a queue) and keeps the rest waiting in arrival order. A request there waits
for a slot and holds up every later one, so each request beyond the capacity (the
new one included) counts `QUEUE_EXTRA` more. Without it, a fast node's queue grew
before a slower node with free slots got a request, and the median paid: at 95 %
load (issue 29, docs/benchmarks.md §3) p50 was 1.13x LMDeploy's
`min_expected_latency` and p90 1.09x, with the tail level. Until a node has queued,
nothing is beyond its batch and the score is (requests + 1) x cost.

Ties rotate, as in least_connections. `explain` gives each candidate's score and
its parts (`fleet.explain()`).

*Many nodes*: scoring a candidate costs about 0.5 µs, under the registry's lock,
for every request, in the proxy and in every client process (287 µs a pick over
512 nodes). Above `SAMPLE_ABOVE` candidates a pick ranks a random sample of
`SAMPLE` of them (drawn with replacement: cheaper, and at these sizes nearly as
many distinct nodes) and the last pick's best two: power of d choices with
memory (Mitzenmacher, Prabhakar and Shah, 2002), a constant cost whatever the
fleet's size. On the noise-free replay of the routing benchmark (128 to 512
nodes, 80 to 99 % load, bench/routing_sample.py) it kept p50, p90 and p99 within
a few percent of ranking every node; without the memory, p99 lost 4-5 % at 128
nodes (docs/benchmarks.md §2).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

from lmfleet.node.state import NodeState
from lmfleet.plain_errors import ConfigError
from lmfleet.routing._rotation import UrlRotation
from lmfleet.routing.base import BaseStrategy, Candidate, RequestInfo

SAMPLE_ABOVE = 64
"""Up to this many candidates a pick ranks them all (at 64 that costs about what a
sample does); above, a random `SAMPLE` and the last pick's best two."""

SAMPLE = 32
"""How many random candidates a pick over more than `SAMPLE_ABOVE` ranks. On the
replay without memory, 16 lost 3 % of p99 at 99 % load over 512 nodes; 32 and 48
did equally well (each ~0.4 µs more per candidate)."""

QUEUE_EXTRA = 0.75
"""What a request beyond a node's batch capacity counts on top of one. Chosen on the
noise-free replay of the routing benchmark (bench/routing_replay.py; 0, 0.25, 0.5,
0.75 against LMDeploy's rule in seven cells) and checked live: 0.5-0.75 keep every
cell's p50, p90 and p99 within a few percent of LMDeploy's or better; 0 loses the
median at 95 % load; larger values send long requests to the slow node and cost the
tail."""


def beyond_batch(node: NodeState, held: float) -> float:
    """Requests on the node, the new one included, past its batch capacity (0 while unknown)."""
    capacity = node.capacity
    return 0.0 if capacity is None else max(0.0, held + 1.0 - capacity)


def cost_source(nodes: Sequence[NodeState]) -> str:
    """Where one request's cost comes from for this pick: the first source every
    candidate has, "speed" (given), "pace" (the node's `/metrics`) or "latency"."""
    if all(node.speed is not None for node in nodes):
        return "speed"
    if all(node.load is not None and node.load.pace is not None for node in nodes):
        return "pace"
    return "latency"


def cost_basis(nodes: Sequence[NodeState]) -> tuple[str, float]:
    """What `expected_waits` reads from all the candidates together: the cost source
    (`cost_source`) and, for "latency", the prior of a node not measured yet (the
    fastest measured one's)."""
    source = cost_source(nodes)
    prior = 1.0
    if source == "latency":
        prior = min((n.latency for n in nodes if n.latency is not None), default=1.0)
    return source, prior


def expected_waits(
    nodes: Sequence[NodeState], now: float, basis: tuple[str, float] | None = None
) -> list[tuple[float, float]]:
    """(expected wait for one more request, requests on the node) per node.

    The load estimate `least_load` ranks by and `prefix_affinity` bounds by: the
    requests on the node (ours, plus the others its report shows) plus this one,
    each beyond the node's batch counting `QUEUE_EXTRA` more, times what one request
    costs there, by the first of these every candidate has:
    1 / the speed the operator gave; the node's decode pace from its `/metrics`
    (seconds per token, `NodeLoad.pace`); else its recent latency in seconds (the
    fastest measured one's for a node not measured yet). `basis`: `cost_basis` of
    the whole candidate list, where `nodes` are some of them.
    """
    # One pass, the node's `held` and `beyond_batch` written out: this runs for every
    # candidate of every request, under the registry's lock (bench/routing_pick.py).
    source, prior = cost_basis(nodes) if basis is None else basis
    parts = []
    for node in nodes:
        load = node.load
        if source == "speed":
            seconds = 1.0 / node.speed  # type: ignore[operator]  # every node has one
        elif source == "pace":
            seconds = load.pace  # type: ignore[union-attr,assignment]  # every node has one
        else:
            seconds = prior if node.latency is None else node.latency
        held = float(node.inflight + node.peers)
        if load is not None:
            held += load.others(now)
        capacity = node.capacity
        beyond = 0.0 if capacity is None or held + 1.0 <= capacity else held + 1.0 - capacity
        parts.append(((held + 1.0 + QUEUE_EXTRA * beyond) * seconds, held))
    return parts


class LeastLoad(BaseStrategy):
    """Pick the node with the least expected time for one more request; ties rotate."""

    name: ClassVar[str] = "least_load"
    uses_node_load: ClassVar[bool] = True
    """The fleet's monitor reads every node's `/metrics` each round for it."""

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sample_above: float = SAMPLE_ABOVE,
        sample: int = SAMPLE,
    ) -> None:
        """`sample_above`, `sample`: rank a random `sample` of the candidates when
        there are more than `sample_above` (`math.inf`: always every one)."""
        if sample < 1 or not sample_above >= 0:
            raise ConfigError(
                f"least_load: sample must be at least 1 and sample_above at least 0, "
                f"got {sample!r} and {sample_above!r}"
            )
        self._rotation = UrlRotation()
        self._clock = clock
        self._rng = rng or random.Random()
        self._sample_above = sample_above
        self._sample = sample
        self._kept: list[int] = []
        """The positions of the last sampled pick's best two: ranked again next time."""

    def _parts(self, nodes: Sequence[NodeState]) -> list[tuple[float, float]]:
        return expected_waits(nodes, self._clock())

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        if len(nodes) > self._sample_above:
            return self._sampled(nodes)
        scores = [score for score, _ in self._parts(nodes)]
        low = min(scores)
        if scores.count(low) == 1:
            return nodes[scores.index(low)]
        return self._rotation.next(nodes, scores, low)

    def _sampled(self, nodes: Sequence[NodeState]) -> NodeState:
        """The best of a random sample and of the last pick's best two (power of d
        choices with memory: nodes found light a moment ago are likely still light).

        The two are kept by position: the registry keeps its nodes' order, and when
        the candidates change, a kept position is just one more random candidate."""
        count = len(nodes)
        positions = self._rng.choices(range(count), k=self._sample)
        positions += [i for i in self._kept if i < count]
        sample = [nodes[i] for i in positions]
        waits = [score for score, _ in self._parts(sample)]
        # A stable sort: ties keep the sample's random order, a fair tie-break.
        ranked = sorted(range(len(waits)), key=waits.__getitem__)[:2]
        self._kept = [positions[i] for i in ranked]
        return sample[ranked[0]]

    def explain_note(self, nodes: Sequence[NodeState], request: RequestInfo) -> str:
        if len(nodes) <= self._sample_above:
            return ""
        return (
            f"a pick ranks a random sample of {self._sample} of the {len(nodes)} candidates "
            "(every one is scored here)"
        )

    def explain(self, nodes: Sequence[NodeState], request: RequestInfo) -> list[Candidate]:
        candidates = []
        source = cost_source(nodes)
        for node, (score, held) in zip(nodes, self._parts(nodes), strict=True):
            others = held - node.inflight - node.peers
            if source == "speed":
                speed = f"speed {node.speed:.3g} (given)"
            elif source == "pace":
                pace = node.load.pace if node.load is not None else None
                speed = f"decodes at {pace:.3g} s per token (its /metrics)"
            elif node.latency is not None:
                speed = f"{node.latency:.3g} s recent latency"
            else:
                speed = "latency not measured yet (fastest candidate's assumed)"
            report = "" if node.load is not None else "; no /metrics report"
            queued = beyond_batch(node, held)
            batch = (
                f"; {queued:.3g} beyond its batch of {node.capacity:.3g}, "
                f"each x{1.0 + QUEUE_EXTRA:.3g}"
                if queued
                else ""
            )
            peers = f", our peers' {node.peers}" if node.peers else ""
            why = (
                f"{held:.3g} request(s) on the node (ours {node.inflight}{peers}, "
                f"others {others:.3g}{report}{batch}); {speed}"
            )
            candidates.append(Candidate(node.url, score, why))
        return candidates
