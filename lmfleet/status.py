"""Read-only, JSON-serialisable views of a fleet for users, dashboards and the proxy.

Node API keys never appear here: `NodeSnapshot` has no field for them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from lmfleet.state import NodeRole, NodeState, NodeStatus


class NodeSnapshot(BaseModel):
    """One node at one instant. Latencies are seconds (EWMA over successes); None = never
    measured. `served` counts 2xx answers, `errors` the node's failures; `error_rate`
    is the failure fraction of its last answers; an ejected node's `message` says why."""

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

    @classmethod
    def of(cls, state: NodeState) -> NodeSnapshot:
        return cls(
            url=state.url,
            state=state.status,
            models=list(state.models),
            role=state.role,
            inflight=state.inflight,
            served=state.served,
            errors=state.errors,
            error_rate=state.error_rate,
            ejections=state.ejections,
            latency=state.latency,
            ttft=state.ttft,
            message=state.message,
            launched=state.launched,
            registered=state.registered,
        )


class FleetStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    strategy: str
    models: list[str]
    nodes: list[NodeSnapshot]

    @property
    def healthy(self) -> int:
        return sum(1 for n in self.nodes if n.state is NodeStatus.HEALTHY)

    def table(self) -> str:
        """A short text table for terminals."""
        header = (
            "node",
            "state",
            "models",
            "inflight",
            "served",
            "errors",
            "error%",
            "latency",
            "ttft",
        )
        rows = [header]
        for n in self.nodes:
            rows.append(
                (
                    n.url,
                    n.state.value,
                    ",".join(n.models) or "-",
                    str(n.inflight),
                    str(n.served),
                    str(n.errors),
                    f"{n.error_rate:.0%}",
                    _ms(n.latency),
                    _ms(n.ttft),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
        ]
        title = f"LMFleet: {self.healthy}/{len(self.nodes)} healthy, strategy={self.strategy}"
        notes = [f"  {n.url} {n.state.value}: {n.message}" for n in self.nodes if _noted(n)]
        return "\n".join([title, *lines, *notes])


def _noted(node: NodeSnapshot) -> bool:
    """Rows whose reason a reader needs: out of routing for a cause, not by choice."""
    return bool(node.message) and node.state in (NodeStatus.EJECTED, NodeStatus.UNHEALTHY)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"
