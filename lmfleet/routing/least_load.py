"""Fewest requests in flight on the node as a whole, not only from this process.

`least_connections` counts only this process's requests. When several clients
share a fleet, each is blind to the others' load. `LeastLoad` blends in what the
nodes report about themselves (LMDeploy's `/metrics`:
`lmdeploy:num_requests_running` + `lmdeploy:num_requests_waiting`), fed into a
`NodeLoads` table by whoever polls the nodes (the strategy itself does no I/O).

A report is already stale when it lands, and it includes this process's own
requests of that moment. So the estimate for a node is

    reported + (local in-flight now - local in-flight when the report was taken)

that is, the report plus what this process sent (or finished) since; never below
the local in-flight count. A node with no report yet counts its local in-flight
only, which makes the strategy `least_connections` until the first reports land.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import ClassVar

from lmfleet.routing._rotation import UrlRotation
from lmfleet.routing.base import RequestInfo
from lmfleet.state import NodeState

_GAUGE = re.compile(
    rb"^lmdeploy:num_requests_(running|waiting)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M
)


def parse_queue(metrics_text: bytes) -> int | None:
    """running + waiting from a node's Prometheus text; None when neither is there."""
    found = _GAUGE.findall(metrics_text)
    if not found:
        return None
    return int(sum(float(value) for _, value in found))


class NodeLoads:
    """The latest self-reported load per node URL, with the local in-flight at that time.

    Written by a poller, read by `LeastLoad.pick`; plain dict assignments, so no lock
    is needed under the GIL.
    """

    __slots__ = ("_reports",)

    def __init__(self) -> None:
        self._reports: dict[str, tuple[int, int]] = {}

    def report(self, url: str, queue: int, local_inflight: int) -> None:
        """`queue` = the node's running + waiting; `local_inflight` = ours at that time."""
        self._reports[url] = (queue, local_inflight)

    def forget(self, url: str) -> None:
        self._reports.pop(url, None)

    def estimate(self, node: NodeState) -> int:
        report = self._reports.get(node.url)
        if report is None:
            return node.inflight
        queue, then = report
        return max(node.inflight, queue + node.inflight - then)


class LeastLoad:
    """Pick a node with the smallest estimated total load; ties rotate (as least_connections)."""

    name: ClassVar[str] = "least_load"

    def __init__(self, loads: NodeLoads | None = None, *, rng: random.Random | None = None) -> None:
        self.loads = loads if loads is not None else NodeLoads()
        self._rotation = UrlRotation()

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        estimate = self.loads.estimate
        loads = [estimate(node) for node in nodes]
        low = min(loads)
        if loads.count(low) == 1:
            return nodes[loads.index(low)]
        return self._rotation.next(nodes, loads, low)
