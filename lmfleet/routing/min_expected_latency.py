"""LMDeploy's `min_expected_latency`, done with what a client can observe.

LMDeploy estimates a node's wait as `unfinished requests / speed`, where `speed`
is a number the operator gave when adding the node, and assumes the *average*
speed for nodes without one. A client has no configured speed but measures each
node's latency, the inverse of it: expected latency = latency x (inflight + 1).

This is a strategy of its own rather than an alias of `min_observed_latency`
because the prior differs: an unmeasured node is assumed *average* (the mean of
the measured latencies, as LMDeploy does), not as fast as the best. Users who
migrate with `min_expected_latency` keep its more conservative exploration.
"""

from __future__ import annotations

import math
from typing import ClassVar

from lmfleet.routing._latency import LatencyScored


class MinExpectedLatency(LatencyScored):
    """Lowest (inflight + 1) x EWMA latency; new nodes assumed average."""

    name: ClassVar[str] = "min_expected_latency"

    def prior(self, measured: list[float]) -> float:
        return math.fsum(measured) / len(measured)
