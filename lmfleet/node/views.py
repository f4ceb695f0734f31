"""Read-only, JSON-serialisable views of a fleet for users, dashboards and the proxy.

Node API keys never appear here: `NodeSnapshot` has no field for them.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from lmfleet.node.state import NodeRole, NodeState, NodeStatus

COLUMN_NAMES: dict[str, str] = {
    "url": "node",
    "state": "state",
    "engine": "engine",
    "models": "models",
    "priority": "tier",
    "inflight": "in-flight",
    "served": "requests",
    "errors": "errors",
    "recent_errors": "recent errors",
    "latency": "latency",
    "p50": "p50 latency",
    "ttft": "TTFT",
    "tokens_per_s": "tokens/s",
    "queue": "node queue",
    "weight_version": "weights",
}
"""The one name of each column any fleet table shows, by the field it shows.

Defined once so that `print(fleet)`, the HTML table and the live dashboard call the
same number by the same name; docs/guide/notebooks.md ("What the columns mean")
explains each, once. `latency` (the smoothed mean, what routing uses) and `p50
latency` (the median of the last 64) are different numbers, so they have different
names.
"""


def columns(*fields: str) -> tuple[str, ...]:
    """The names of the columns showing `fields` (keys of `COLUMN_NAMES`), in order."""
    return tuple(COLUMN_NAMES[field] for field in fields)


METERED_COLUMNS = columns("p50", "tokens_per_s")
"""Columns that need the traffic history a notebook's meter keeps, not in a snapshot."""

NOTEBOOK_COLUMNS = columns(
    "url",
    "state",
    "engine",
    "models",
    "priority",
    "inflight",
    "queue",
    "served",
    "errors",
    "recent_errors",
    "latency",
    "p50",
    "ttft",
    "tokens_per_s",
    "weight_version",
)
"""The HTML table's and the dashboard's columns."""

TEXT_COLUMNS = tuple(c for c in NOTEBOOK_COLUMNS if c not in METERED_COLUMNS)
"""`FleetStatus.table()`'s columns (`print(fleet)`): the notebook's, less the metered
ones, which one snapshot cannot give."""

QUEUE_CURRENT_ROUNDS = 2.0
"""A node's `/metrics` report counts as current for this many of the monitor's
intervals: one round, with room for its jitter and the read's own time."""


def queue_cell(queue: float | None, age: float | None, current: bool) -> str:
    """The `node queue` cell: the node's count when its report is current, else the
    count with the report's age (`3 (12s ago)`), never an old count passed as now."""
    if queue is None:
        return "-"
    if current or age is None:
        return f"{queue:g}"
    return f"{queue:g} ({age:.1f}s ago)" if age < 10 else f"{queue:g} ({age:.0f}s ago)"


def engine_cell(engine: str | None, version: str | None) -> str:
    """The `engine` cell: `vllm 0.33.0`, `lmdeploy`, or `-` while not recognised."""
    if engine is None:
        return "-"
    return f"{engine} {version}" if version else engine


def recent_errors_cell(error_rate: float, answers: int) -> str:
    """The `recent errors` cell: failures of the node's last answers, `failed/answers`
    (the outlier window, at most `OutlierOptions.window` answers); `-` before any."""
    if answers <= 0:
        return "-"
    return f"{round(error_rate * answers)}/{answers}"


_IDLE_REASONS: dict[NodeStatus, str] = {
    NodeStatus.STARTING: "no health check has passed yet",
    NodeStatus.SLEEPING: "asleep; fleet.wakeup() wakes it",
    NodeStatus.DRAINING: "draining: it takes no new requests",
}


class NodeSnapshot(BaseModel):
    """One node at one instant. Latencies are seconds (EWMA over successes); None = never
    measured. `served` counts 2xx answers, `errors` the node's failures; `error_rate`
    is the failure fraction of its `recent_answers` last answers; an ejected node's
    `message` says why.
    `queue`, `cache_usage`, `prefix_hit_rate` and `pace` (seconds per token per
    sequence) come from the node's own `/metrics`, read `queue_age` seconds ago;
    `speed` is the one given, if any."""

    model_config = ConfigDict(frozen=True)

    url: str
    state: NodeStatus
    models: list[str]
    role: NodeRole
    inflight: int
    served: int
    errors: int
    error_rate: float
    ejections: int
    latency: float | None
    ttft: float | None
    message: str
    launched: bool
    registered: bool = False
    recent_answers: int = 0
    """The answers `error_rate` is over: the node's last ones, at most the outlier
    window (`OutlierOptions.window`), counted afresh since its last ejection."""
    queue: float | None = None
    """Requests the node holds by its own latest `/metrics` report, every client's."""
    queue_age: float | None = None
    """Seconds since that report was read; None: no report."""
    queue_current: bool = False
    """Whether `queue` may stand for the node's queue now: the report is at most
    `QUEUE_CURRENT_ROUNDS` monitor intervals old, and it was not read while requests
    of this fleet ran on the node that have all ended since. False: the tables show
    it with its age."""
    cache_usage: float | None = None
    """KV cache in use, 0..1, by that report."""
    prefix_hit_rate: float | None = None
    """Prefix cache hit rate, 0..1, by that report."""
    speed: float | None = None
    priority: int = 0
    """Its tier: higher is preferred (lmfleet/routing/tiers.py)."""
    settings: dict[str, Any] = {}
    """Its own settings (`NodeOptions.shown()`): health path, interval and timeout, the
    environment variables its secrets come from, the names of its extra headers; never
    a secret's value."""
    pace: float | None = None
    weight_version: int = 0
    """The weight version the fleet recorded for it (RL weight updates)."""
    quarantine: str = ""
    """Why a failed weight update left it out of routing; empty otherwise."""
    engine: str | None = None
    """Its engine ("lmdeploy", "vllm", "sglang", "openai"), given or recognised from
    its `/v1/models`; None until it first answered (docs/guide/engines.md)."""
    engine_version: str | None = None
    """The engine's version as the node reports it; None where it does not say."""
    peers: int = 0
    """Requests the proxy's other workers (or replicas sharing a store) have on the
    node, as they shared them; `inflight` is this process's own."""

    def reason(self) -> str:
        """Its state and why, for messages: `unhealthy (Connection refused)`."""
        why = self.message or _IDLE_REASONS.get(self.state, "")
        return f"{self.state.value} ({why})" if why else self.state.value

    @property
    def recent_errors(self) -> int:
        """Failures among the `recent_answers`."""
        return round(self.error_rate * self.recent_answers)

    @classmethod
    def of(cls, state: NodeState, now: float | None = None) -> NodeSnapshot:
        """`state` as seen at `now` (`time.monotonic()`, by default)."""
        load = state.load
        age = None
        current = False
        if load is not None:
            age = max(0.0, (time.monotonic() if now is None else now) - load.read_at)
            ended = state.inflight == 0 and load.local_inflight > 0
            current = age <= QUEUE_CURRENT_ROUNDS * load.fresh_for and not ended
        return cls(
            url=state.url,
            state=state.status,
            models=list(state.models),
            role=state.role,
            inflight=state.inflight,
            served=state.served,
            errors=state.errors,
            error_rate=state.error_rate,
            recent_answers=state.recent_answers,
            ejections=state.ejections,
            latency=state.latency,
            ttft=state.ttft,
            message=state.message,
            launched=state.launched,
            registered=state.registered,
            queue=load.outstanding if load is not None else None,
            queue_age=age,
            queue_current=current,
            cache_usage=load.cache_usage if load is not None else None,
            prefix_hit_rate=load.prefix_hit_rate if load is not None else None,
            speed=state.speed,
            priority=state.priority,
            settings=state.options.shown() if state.options is not None else {},
            weight_version=state.weight_version,
            quarantine=state.quarantine,
            pace=load.pace if load is not None else None,
            engine=state.engine,
            engine_version=state.engine_version,
            peers=state.peers,
        )


class FleetStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    strategy: str
    models: list[str]
    nodes: list[NodeSnapshot]

    @property
    def healthy(self) -> int:
        return sum(1 for n in self.nodes if n.state is NodeStatus.HEALTHY)

    def table(self, *, notes: bool = True) -> str:
        """A short text table for terminals, in `TEXT_COLUMNS`; `notes` adds a line with
        the reason of each unhealthy or ejected node."""
        header = TEXT_COLUMNS
        rows = [header]
        for n in self.nodes:
            rows.append(
                (  # in TEXT_COLUMNS order
                    n.url,
                    n.state.value,
                    engine_cell(n.engine, n.engine_version),
                    ",".join(n.models) or "-",
                    str(n.priority),
                    str(n.inflight),
                    queue_cell(n.queue, n.queue_age, n.queue_current),
                    str(n.served),
                    str(n.errors),
                    recent_errors_cell(n.error_rate, n.recent_answers),
                    _ms(n.latency),
                    _ms(n.ttft),
                    f"v{n.weight_version}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
        ]
        title = f"LMFleet: {self.healthy}/{len(self.nodes)} healthy, strategy={self.strategy}"
        reasons = [f"  {n.url} {n.state.value}: {n.message}" for n in self.nodes if _noted(n)]
        return "\n".join([title, *lines, *(reasons if notes else ())])


def _noted(node: NodeSnapshot) -> bool:
    """Rows whose reason a reader needs: out of routing for a cause, not by choice."""
    cause = node.state in (NodeStatus.EJECTED, NodeStatus.UNHEALTHY) or bool(node.quarantine)
    return bool(node.message) and cause


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"
