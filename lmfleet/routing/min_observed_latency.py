"""Lowest observed latency, weighted by load, with an optimistic prior.

LMDeploy's `min_observed_latency` scores a node with no samples as infinitely
slow, so a node added to a running fleet never receives a request and never gets
a sample. Here an unmeasured node is assumed as fast as the fastest measured one:
it ties with the best idle node and gets traffic at once. The prior is the
minimum rather than 0 on purpose: a node's latency is recorded only when its
first response completes, and with a prior of 0 its score would stay 0 whatever
its in-flight count, so a burst would pile every request onto the new node
before it answered once. With the minimum, `inflight` still spreads the burst.
"""

from __future__ import annotations

from typing import ClassVar

from lmfleet.routing._latency import LatencyScored


class MinObservedLatency(LatencyScored):
    """Lowest EWMA latency x (inflight + 1); new nodes look as fast as the best."""

    name: ClassVar[str] = "min_observed_latency"

    def prior(self, measured: list[float]) -> float:
        return min(measured)
