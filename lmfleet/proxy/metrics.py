"""Prometheus metrics for one proxy app, in its own `CollectorRegistry`.

Node counters and states are read from registry snapshots at scrape time (a
custom collector: nothing to update per request); latency and TTFT histograms
are observed per request by the hot path, labelled by node.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lmfleet.node.state import NodeStatus

if TYPE_CHECKING:
    from lmfleet.surface import FleetSurface

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_CHILDREN = 4096
"""Labelled metric children kept looked up (routes, error kinds, node URLs)."""

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


class ProxyMetrics:
    """The proxy's metrics; one per app."""

    def __init__(self, fleet: FleetSurface, worker: int | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_NodeCollector(fleet))
        self._requests = Counter(
            "lmfleet_proxy_requests",
            "requests the proxy answered",
            ["route"],
            registry=self.registry,
        )
        self._errors = Counter(
            "lmfleet_proxy_errors",
            "requests the proxy answered with an error",
            ["kind"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "lmfleet_proxy_inflight", "requests in flight in the proxy", registry=self.registry
        )
        self._latency = Histogram(
            "lmfleet_proxy_request_duration_seconds",
            "time from forwarding to the last byte, per node",
            ["node"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._ttft = Histogram(
            "lmfleet_proxy_ttft_seconds",
            "time from forwarding to the first body byte, per node",
            ["node"],
            buckets=BUCKETS,
            registry=self.registry,
        )

        self._worker: Any = None
        if worker is not None:  # `--workers`: how the kernel spread the connections
            self._worker = Counter(
                "lmfleet_proxy_worker_requests",
                "requests each worker of `lmfleet serve --workers` answered",
                ["worker"],
                registry=self.registry,
            ).labels(str(worker))

        # `labels()` takes a lock and builds a key on every call; the hot path calls
        # three of them per request, so each labelled child is looked up once.
        self._children: dict[tuple[str, str], Any] = {}

    def _child(self, metric: Any, name: str, label: str) -> Any:
        child = self._children.get((name, label))
        if child is None:
            if len(self._children) >= MAX_CHILDREN:  # node URLs come and go
                self._children.clear()
            child = self._children[(name, label)] = metric.labels(label)
        return child

    def request(self, route: str) -> None:
        self._child(self._requests, "requests", route).inc()
        if self._worker is not None:
            self._worker.inc()

    def error(self, kind: str) -> None:
        self._child(self._errors, "errors", kind).inc()

    def latency(self, node: str, seconds: float) -> None:
        self._child(self._latency, "latency", node).observe(seconds)

    def ttft(self, node: str, seconds: float) -> None:
        self._child(self._ttft, "ttft", node).observe(seconds)

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data
