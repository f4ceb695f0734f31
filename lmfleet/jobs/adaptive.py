"""`concurrency="auto"`: a batch's requests in flight, from the nodes' own signals.

A fixed concurrency is a guess: too low leaves GPUs idle, too high fills every
node's queue, which adds nothing to throughput (a node decodes at most its batch
size at once) but makes every request beside the batch wait behind it. The right
number is "as many as the nodes run at once, and no more", and the nodes say when
that is passed: requests start to wait in their queues (`num_requests_waiting` in
`/metrics`), or they refuse (429/503).

So the limit grows while no node queues the batch's requests and the limit is what
holds the batch back, and shrinks when a queue forms or a node refuses:
- **slow start**: doubling each report until a node queues (a cold batch reaches
  the fleet's capacity in a few reports, not hundreds);
- then **additive increase**, by one request per node per report, while a node has
  room and the queues of the others hold less than a refill (routing prefers the
  fastest nodes: growing for a slow node's room would only deepen their queues);
- **multiplicative decrease**, to 3/4, on a queue longer than a quarter of what the
  nodes run (`QUEUE_SHARE`) or on a refusal since the last report.

Each decision waits for a new `/metrics` report (the monitor reads them every probe
round): a limit is never cut twice for one stale queue, and it grows again only on a
report read after its last growth (on a loaded machine reports come late, and
doubling on a report older than the last doubling overshoots). A report read after a
doubling can still predate the requests it let out (they were in transit, or the node
wrote its report before they came), so slow start doubles again only once the nodes
report more requests than the limit held before that doubling: its requests reached
them. Without that, one late report doubles a limit its nodes never saw, and two
put a batch at eight times what they run before the first queue is reported.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

QUEUE_SHARE = 0.25
"""Waiting requests tolerated, as a share of those running, before the limit shrinks:
a short queue keeps every slot of a node filled as requests end (without one the
batch leaves slots idle between two requests), and an interactive request that
arrives waits behind a quarter of a batch at most."""
HOLD_AT = 1.5
"""While a node has room, growth stops once the other nodes' queues hold this many
refills: routing prefers the fastest nodes, so growing for a slow node's room mostly
deepens their queues (measured: bench/batch_auto.py, docs/benchmarks.md §8)."""
QUEUE_FLOOR = 1.0
"""Waiting requests per node always tolerated (a queue of one is a refill)."""
DECREASE = 0.75
START_PER_NODE = 8
"""The first limit, per node: fewer than any LMDeploy node decodes at once (its
`max_batch_size` is 128 or more on a GPU), so the batch starts below every node's
capacity and slow start finds the rest in a few reports."""
MINIMUM = 1


@dataclass(frozen=True)
class Signals:
    """The fleet as one report says it."""

    nodes: tuple[tuple[float, float], ...]
    """`(waiting, running)` of each node the batch can use now: requests waiting in
    its queues (engine and api server), and those it decodes."""
    refused: int
    """429/503 answers the batch got since the last report."""
    report: float
    """When the newest report was read (a decision is made once per report)."""
    complete: bool = True
    """Whether every node the batch can use reported (`nodes` holds them all): only
    then can the reports show where all of the batch's requests are."""


class AdaptiveConcurrency:
    """The batch's in-flight limit (see the module docstring); `limit` is the current one."""

    def __init__(self, maximum: int, start: int = START_PER_NODE) -> None:
        if maximum < 1:
            raise ValueError("the maximum concurrency must be at least 1")
        self.maximum = maximum
        self.limit = max(MINIMUM, min(start, maximum))
        self.slow_start = True
        self._report = -math.inf
        self._grown = -math.inf  # when the limit last grew
        self._before = 0  # the limit before its last growth

    def observe(self, signals: Signals, inflight: int, now: float | None = None) -> int:
        """The new limit after one look at the fleet (`inflight`: the batch's requests
        in flight now; `now`: `time.monotonic()`, the clock of `signals.report`)."""
        if signals.report <= self._report:
            return self.limit  # nothing new since the last decision
        self._report = signals.report
        now = time.monotonic() if now is None else now
        count = max(len(signals.nodes), 1)
        full = [waiting > QUEUE_FLOOR for waiting, _ in signals.nodes]
        running = sum(run for _, run in signals.nodes)
        queued = sum(waiting for waiting, _ in signals.nodes)
        refill = max(QUEUE_FLOOR * count, QUEUE_SHARE * running)
        if any(full) or signals.refused > 0:
            self.slow_start = False  # a node is full: from here on, one step at a time
        if signals.refused > 0:
            self.limit = max(MINIMUM, math.floor(self.limit * DECREASE))
        elif signals.nodes and all(full):  # every node queues: hold what they run, and a refill
            target = max(MINIMUM, math.ceil(running + refill))
            if self.limit > target:
                self.limit = max(target, math.floor(self.limit * DECREASE))
        elif queued > HOLD_AT * refill:
            pass  # a node has room, but the others' queues hold enough already: hold
        elif inflight >= self.limit - count and self._shows_last_growth(signals, running):
            # A node has room, the limit holds the batch back, and the report can show
            # what the last growth did.
            grown = self.limit * 2 if self.slow_start else self.limit + count
            self._before, self.limit = self.limit, min(self.maximum, grown)
            self._grown = now
        return self.limit

    def _shows_last_growth(self, signals: Signals, running: float) -> bool:
        """Whether the report was read after the last growth and, in slow start, the
        nodes hold more requests than the limit did before it (see the module
        docstring). An additive step waits for the timing alone: it overshoots by one
        request per node at most, and between two requests of a batch a node always
        holds a few fewer than it was sent, so asking for all of them could stall it."""
        if signals.report < self._grown:
            return False
        if not self.slow_start or not signals.nodes or not signals.complete:
            return True
        waiting = sum(wait for wait, _ in signals.nodes)
        return waiting + running > self._before
