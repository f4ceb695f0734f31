"""Prometheus metrics for one proxy app, in its own `CollectorRegistry`.

Node counters and states are read from registry snapshots at scrape time (a
custom collector: nothing to update per request); the proxy's own counters and its
latency and TTFT histograms (labelled by node) are plain numbers the hot path adds
to, turned into Prometheus families at scrape time too (`_Tallies`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from lmfleet.node.state import NodeStatus

if TYPE_CHECKING:
    from lmfleet.surface import FleetSurface

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_CHILDREN = 4096
"""Node histograms kept at most (node URLs come and go)."""

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _NodeCollector(Collector):
    def __init__(self, fleet: FleetSurface) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        nodes = self._fleet.registry.snapshot()
        inflight = GaugeMetricFamily(
            "lmfleet_node_inflight", "requests in flight on the node", labels=["node"]
        )
        served = CounterMetricFamily(
            "lmfleet_node_requests", "requests the node answered with a 2xx", labels=["node"]
        )
        errors = CounterMetricFamily(
            "lmfleet_node_errors",
            "requests that failed on the node (5xx, unreachable, timed out, cut)",
            labels=["node"],
        )
        error_rate = GaugeMetricFamily(
            "lmfleet_node_error_rate", "failure fraction of the last answers", labels=["node"]
        )
        ejections = GaugeMetricFamily(
            "lmfleet_node_ejections",
            "times the node was ejected since it last succeeded on probation",
            labels=["node"],
        )
        state = GaugeMetricFamily(
            "lmfleet_node_state", "1 for the node's current state", labels=["node", "state"]
        )
        latency = GaugeMetricFamily(
            "lmfleet_node_latency_seconds", "smoothed request latency", labels=["node"]
        )
        version = GaugeMetricFamily(
            "lmfleet_node_weight_version",
            "the weight version the fleet recorded for the node (RL weight updates)",
            labels=["node"],
        )
        quarantined = GaugeMetricFamily(
            "lmfleet_node_quarantined",
            "1 while a failed weight update keeps the node out of routing",
            labels=["node"],
        )
        priority = GaugeMetricFamily(
            "lmfleet_node_priority",
            "the node's tier: higher is preferred (lmfleet/routing/tiers.py)",
            labels=["node"],
        )
        engine = GaugeMetricFamily(
            "lmfleet_node_engine",
            "1 for the node's engine and version (lmfleet/node/profile.py; empty until recognised)",
            labels=["node", "engine", "version"],
        )
        for node in nodes:
            engine.add_metric([node.url, node.engine or "", node.engine_version or ""], 1.0)
            priority.add_metric([node.url], node.priority)
            version.add_metric([node.url], node.weight_version)
            quarantined.add_metric([node.url], 1.0 if node.quarantine else 0.0)
            inflight.add_metric([node.url], node.inflight)
            served.add_metric([node.url], node.served)
            errors.add_metric([node.url], node.errors)
            error_rate.add_metric([node.url], node.error_rate)
            ejections.add_metric([node.url], node.ejections)
            for status in NodeStatus:
                state.add_metric([node.url, status.value], 1.0 if node.status is status else 0.0)
            if node.latency is not None:
                latency.add_metric([node.url], node.latency)
        yield from (inflight, served, errors, error_rate, ejections, state, latency)
        yield from (version, quarantined, priority, engine)
        spills = CounterMetricFamily(
            "lmfleet_tier_spills",
            "requests sent below the best priority tier, by why: health (too few of its "
            "nodes healthy) or load (its nodes busy)",
            labels=["reason"],
        )
        for reason, count in self._fleet.registry.spills.items():
            spills.add_metric([reason], count)
        yield spills
        yield GaugeMetricFamily(
            "lmfleet_requests_waiting",
            "requests waiting for an eligible node (the admission queue), every client "
            "of the fleet and the proxy together",
            value=self._fleet.registry.waiting,
        )


class _Histogram:
    """One labelled histogram's counts: a bisect and two additions per observation.

    prometheus_client's `Histogram.observe` walks the buckets and takes a lock per
    value it adds (the bucket, the sum); the proxy observes two per request in its
    one event loop thread, where nothing else touches them until the scrape."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        rows: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*map(str, map(float, BUCKETS)), "+Inf"), self.counts, strict=True):
            running += count
            rows.append((bound, running))
        return rows


class _Tallies(Collector):
    """What the hot path counts per request, kept as plain numbers and turned into
    Prometheus families at scrape time (same names and labels as before)."""

    def __init__(self, worker: int | None) -> None:
        self.requests: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.lane: dict[str, int] = {}
        self.inflight = 0
        self.latency: dict[str, _Histogram] = {}
        self.ttft: dict[str, _Histogram] = {}
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        yield _counter(
            "lmfleet_proxy_requests", "requests the proxy answered", "route", self.requests
        )
        errors = "requests the proxy answered with an error"
        yield _counter("lmfleet_proxy_errors", errors, "kind", self.errors)
        yield _counter(
            "lmfleet_proxy_fast_lane",
            "plain requests whose first attempt the front door made itself "
            "(lmfleet/proxy/fast_lane.py): answered there, or failed over by the pipeline",
            "outcome",
            self.lane,
        )
        yield GaugeMetricFamily(
            "lmfleet_proxy_inflight", "requests in flight in the proxy", value=self.inflight
        )
        yield _histogram(
            "lmfleet_proxy_request_duration_seconds",
            "time from forwarding to the last byte, per node",
            self.latency,
        )
        yield _histogram(
            "lmfleet_proxy_ttft_seconds",
            "time from forwarding to the first body byte, per node",
            self.ttft,
        )
        if self.worker is not None:  # `--workers`: how the kernel spread the connections
            yield _counter(
                "lmfleet_proxy_worker_requests",
                "requests each worker of `lmfleet serve --workers` answered",
                "worker",
                {str(self.worker): sum(self.requests.values())},
            )


def _counter(name: str, documentation: str, label: str, counts: dict[str, int]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family


def _histogram(name: str, documentation: str, by_node: dict[str, _Histogram]) -> Metric:
    family = HistogramMetricFamily(name, documentation, labels=["node"])
    for node, histogram in by_node.items():
        family.add_metric([node], histogram.cumulative(), histogram.total)
    return family


class ProxyMetrics:
    """The proxy's metrics; one per app. Updated from the proxy's event loop thread only."""

    def __init__(self, fleet: FleetSurface, worker: int | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_NodeCollector(fleet))
        self._tallies = _Tallies(worker)
        self.registry.register(self._tallies)

    def request(self, route: str) -> None:
        requests = self._tallies.requests
        requests[route] = requests.get(route, 0) + 1

    def forwarding(self, change: int) -> None:
        """A forwarded request starts (+1) or ends (-1): `lmfleet_proxy_inflight`."""
        self._tallies.inflight += change

    def error(self, kind: str) -> None:
        errors = self._tallies.errors
        errors[kind] = errors.get(kind, 0) + 1

    def lane(self, outcome: str) -> None:
        """A fast-lane attempt's `outcome`: `answered`, or `failed_over` (the pipeline
        took it on)."""
        lane = self._tallies.lane
        lane[outcome] = lane.get(outcome, 0) + 1

    def latency(self, node: str, seconds: float) -> None:
        _observe(self._tallies.latency, node, seconds)

    def ttft(self, node: str, seconds: float) -> None:
        _observe(self._tallies.ttft, node, seconds)

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data


def _observe(by_node: dict[str, _Histogram], node: str, seconds: float) -> None:
    histogram = by_node.get(node)
    if histogram is None:
        if len(by_node) >= MAX_CHILDREN:  # node URLs come and go
            by_node.clear()
        histogram = by_node[node] = _Histogram()
    histogram.observe(seconds)
