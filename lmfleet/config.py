"""Typed options, passed explicitly. Nothing here reads the environment."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmfleet.errors import ConfigError

ServingStrategy = Literal["Hybrid", "DistServe"]
"""LMDeploy's proxy `--serving-strategy` names (docs/distserve.md)."""


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HealthOptions(_Options):
    """Active health checking (DESIGN.md, "Node states and routing rules")."""

    interval: float = Field(default=2.0, gt=0, description="seconds between probes of one node")
    jitter: float = Field(
        default=0.1, ge=0, le=1, description="fraction of interval added at random"
    )
    timeout: float = Field(default=2.0, gt=0, description="seconds one probe may take")
    unhealthy_after: int = Field(
        default=2, ge=1, description="consecutive failures before unhealthy"
    )


DEFAULT_FIRST_BYTE_TIMEOUT = 300.0
"""Five minutes: a streamed answer's first byte is its first token, which even a very
long prompt queued on a busy node reaches well within it; a non-streamed answer's
first byte comes with its last token, so generations longer than this must stream
or raise it (docs/guide/failover.md)."""


class OutlierOptions(_Options):
    """Outlier ejection from answers, Envoy's model (docs/guide/failover.md).

    A node that keeps failing while `/health` stays green (an OOM loop, a wedged
    engine, bad weights) is taken out of routing for `base_ejection_time` times the
    number of times it has been ejected (capped), then re-admitted on probation: one
    success clears its record, one failure ejects it again at once.
    """

    enabled: bool = True
    consecutive_failures: int = Field(
        default=5, ge=1, description="failures in a row that eject a node"
    )
    error_rate: float = Field(
        default=0.5, gt=0, le=1, description="failure fraction over the window that ejects"
    )
    window: int = Field(default=20, ge=1, description="recent answers the error rate is over")
    min_requests: int = Field(
        default=10, ge=1, description="answers in the window before the rate may eject"
    )
    base_ejection_time: float = Field(default=30.0, gt=0, description="seconds, times ejections")
    max_ejection_time: float = Field(default=300.0, gt=0)
    max_ejection_percent: float = Field(
        default=50.0,
        ge=0,
        le=100,
        description="never eject more of the nodes than this; past it they keep routing "
        "(panic mode) rather than refuse everything",
    )


class RoutingOptions(_Options):
    """What the transports do when a node fails or none is eligible."""

    wait_for_node: float = Field(
        default=30.0, ge=0, description="seconds to wait for an eligible node"
    )
    wake_on_demand: bool = Field(
        default=False, description="wake a sleeping node when none is eligible"
    )
    max_attempts: int = Field(
        default=3, ge=1, description="nodes tried per request before giving up"
    )
    retry_status: frozenset[int] = Field(
        default=frozenset({500, 502, 503, 504}),
        description="answers tried again on another node while nothing reached the caller",
    )
    first_byte_timeout: float | None = Field(
        default=DEFAULT_FIRST_BYTE_TIMEOUT,
        gt=0,
        description="seconds a node may stay silent before its first response byte "
        "(then the attempt fails over); None: only the caller's timeout",
    )
    backoff: float = Field(
        default=0.05, ge=0, description="first pause between failover attempts (jittered)"
    )
    max_backoff: float = Field(default=1.0, ge=0)
    connect_timeout: float = Field(
        default=5.0, gt=0, description="seconds to open a connection to a node"
    )
    max_connections: int = Field(
        default=1024, ge=1, description="connection pool size per transport"
    )


class DistServeOptions(_Options):
    """Prefill/decode disaggregation: how pairs are connected (LMDeploy's proxy flags)."""

    migration_protocol: Literal["RDMA"] = Field(
        default="RDMA", description="KV migration protocol (LMDeploy 0.18 supports RDMA only)"
    )
    link_type: Literal["RoCE", "IB"] = Field(default="RoCE", description="RDMA link type")
    with_gdr: bool = Field(default=True, description="GPU Direct RDMA")
    control_timeout: float = Field(
        default=10.0, gt=0, description="seconds for one /distserve/* control call"
    )


class FleetOptions(_Options):
    """Everything an `LMFleet` is configured with."""

    health: HealthOptions = HealthOptions()
    routing: RoutingOptions = RoutingOptions()
    outliers: OutlierOptions = OutlierOptions()
    serving_strategy: ServingStrategy = Field(
        default="Hybrid", description="Hybrid: one node per request; DistServe: prefill -> decode"
    )
    distserve: DistServeOptions = DistServeOptions()
    min_ready: int = Field(default=1, ge=1, description="healthy nodes that wait_ready waits for")
    drain_timeout: float = Field(
        default=30.0, ge=0, description="seconds to let in-flight requests end"
    )
    admin_timeout: float = Field(default=30.0, gt=0, description="seconds for sleep/wakeup calls")


def merge_options(
    options: FleetOptions | None,
    *,
    health_interval: float | None,
    unhealthy_after: int | None,
    wait_for_node: float | None,
    wake_on_demand: bool | None,
    min_ready: int | None,
    serving_strategy: str | None = None,
    first_byte_timeout: float | None = None,
) -> FleetOptions:
    """Keyword shortcuts override the matching fields of `options`."""
    base = options or FleetOptions()
    health: dict[str, Any] = {}
    routing: dict[str, Any] = {}
    top: dict[str, Any] = {}
    if serving_strategy is not None:
        top["serving_strategy"] = serving_strategy
    if health_interval is not None:
        health["interval"] = health_interval
        health["timeout"] = min(base.health.timeout, max(health_interval, 0.5))
    if unhealthy_after is not None:
        health["unhealthy_after"] = unhealthy_after
    if wait_for_node is not None:
        routing["wait_for_node"] = wait_for_node
    if wake_on_demand is not None:
        routing["wake_on_demand"] = wake_on_demand
    if first_byte_timeout is not None:
        routing["first_byte_timeout"] = first_byte_timeout
    if min_ready is not None:
        top["min_ready"] = min_ready
    try:
        return FleetOptions(
            health=HealthOptions(**{**base.health.model_dump(), **health}),
            routing=RoutingOptions(**{**base.routing.model_dump(), **routing}),
            outliers=base.outliers,
            **{**base.model_dump(exclude={"health", "routing", "outliers"}), **top},
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
