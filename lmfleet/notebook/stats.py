"""What the dashboard shows per node: snapshot fields plus p50 latency and tokens/s
(`status.METERED_COLUMNS`, which need the traffic history kept here).

Pure computation over `NodeRegistry` reads; nothing here touches the request path.

"tokens/s" is *generated tokens per second over the last few seconds*, counted on
the client side: each chunk of a streamed response counts as one token (LMDeploy
streams about one token per chunk), and the batch helpers (`chat_many`, ...) add
each non-streamed response's `usage.completion_tokens`. Non-streamed requests sent
by your own code are not counted (their bodies carry no per-token signal).
"""

from __future__ import annotations

import statistics
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmfleet.node.state import NodeStatus
from lmfleet.node.views import FleetStatus, NodeSnapshot
from lmfleet.registry import NodeRegistry

if TYPE_CHECKING:
    from lmfleet.surface import FleetSurface

RATE_WINDOW = 5.0
"""Seconds over which tokens/s is averaged."""


@dataclass(frozen=True)
class NodeRow:
    """One dashboard row. Times are seconds; None = not measured yet."""

    url: str
    state: NodeStatus
    models: list[str]
    inflight: int
    served: int
    errors: int
    error_rate: float
    latency: float | None
    p50: float | None
    ttft: float | None
    tokens: int
    tokens_per_s: float | None
    """None until the meter has seen the node twice (a rate needs two samples)."""
    message: str
    queue: float | None = None
    """Requests the node holds by its own `/metrics` (every client's); None: no report."""
    queue_age: float | None = None
    queue_current: bool = False
    """As `NodeSnapshot.queue_age` / `queue_current`: how old that report is, and
    whether it may stand for now."""
    recent_answers: int = 0
    """The node's last answers `error_rate` is over (`NodeSnapshot.recent_answers`)."""
    weight_version: int = 0
    priority: int = 0
    engine: str | None = None
    engine_version: str | None = None


@dataclass(frozen=True)
class FleetView:
    """Every row plus fleet totals, at one instant."""

    strategy: str
    rows: list[NodeRow]

    @property
    def healthy(self) -> int:
        return sum(1 for r in self.rows if r.state is NodeStatus.HEALTHY)

    @property
    def inflight(self) -> int:
        return sum(r.inflight for r in self.rows)

    @property
    def served(self) -> int:
        return sum(r.served for r in self.rows)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.rows)

    @property
    def tokens_per_s(self) -> float | None:
        rates = [r.tokens_per_s for r in self.rows if r.tokens_per_s is not None]
        return sum(rates) if rates else None


class TrafficMeter:
    """Turns the registry's cumulative token counts into recent rates.

    Each `view()` call records a (time, tokens) sample per node; the rate is the
    token delta over the samples of the last `window` seconds. Safe to share between
    threads (the dashboard's refresh task and `_repr_html_` calls).
    """

    def __init__(
        self,
        registry: NodeRegistry,
        *,
        window: float = RATE_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._window = window
        self._clock = clock
        self._samples: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def _rate(self, url: str, now: float, tokens: int) -> float | None:
        with self._lock:
            samples = self._samples.setdefault(url, deque())
            if samples and tokens < samples[-1][1]:
                samples.clear()  # the node was removed and added again: counts anew
            samples.append((now, tokens))
            while len(samples) > 2 and now - samples[1][0] >= self._window:
                samples.popleft()
            first_t, first_tokens = samples[0]
        span = now - first_t
        return (tokens - first_tokens) / span if span > 0 else None

    def row(self, node: NodeSnapshot, now: float) -> NodeRow:
        latencies, tokens = self._registry.traffic(node.url)
        rate = self._rate(node.url, now, tokens)
        return NodeRow(
            url=node.url,
            state=node.state,
            models=node.models,
            inflight=node.inflight,
            served=node.served,
            errors=node.errors,
            error_rate=node.error_rate,
            latency=node.latency,
            p50=statistics.median(latencies) if latencies else None,
            ttft=node.ttft,
            tokens=tokens,
            tokens_per_s=rate,
            message=node.message,
            queue=node.queue,
            queue_age=node.queue_age,
            queue_current=node.queue_current,
            recent_answers=node.recent_answers,
            weight_version=node.weight_version,
            priority=node.priority,
            engine=node.engine,
            engine_version=node.engine_version,
        )

    def view(self, status: FleetStatus) -> FleetView:
        now = self._clock()
        rows = [self.row(node, now) for node in status.nodes]
        return FleetView(strategy=status.strategy, rows=rows)


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}"


STATE_COLOURS: dict[NodeStatus, str] = {
    NodeStatus.STARTING: "#1f77b4",
    NodeStatus.HEALTHY: "#2ca02c",
    NodeStatus.UNHEALTHY: "#d62728",
    NodeStatus.EJECTED: "#e377c2",
    NodeStatus.SLEEPING: "#9467bd",
    NodeStatus.DRAINING: "#ff7f0e",
    NodeStatus.STOPPED: "#7f7f7f",
}


_METERS: weakref.WeakKeyDictionary[FleetSurface, TrafficMeter] = weakref.WeakKeyDictionary()


def meter_for(fleet: FleetSurface) -> TrafficMeter:
    """The fleet's shared token-rate meter, so successive displays show a rate."""
    meter = _METERS.get(fleet)
    if meter is None:
        meter = _METERS[fleet] = TrafficMeter(fleet.registry)
    return meter
