"""Typed options, passed explicitly. Nothing here reads the environment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

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
    telemetry: bool = Field(
        default=True,
        description="read healthy nodes' /metrics after their /health (their own load, "
        "for least_load and the status views)",
    )
    metrics_interval: float | None = Field(
        default=None,
        gt=0,
        description="seconds between /metrics reads of a node; None: every probe round "
        "when the strategy routes on node load (least_load), else every 10 s",
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
    admission_queue: int = Field(
        default=1024,
        ge=0,
        description="requests that may wait for an eligible node at once (each up to "
        "wait_for_node); one more is refused at once: FleetBusyError, or 503 with "
        "Retry-After through the proxy",
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
        default=1024,
        ge=1,
        description="connections open at once per transport, over all nodes (the proxy's "
        "upstream pool; each routed client's pool); further requests wait for a free one "
        "up to the pool timeout (httpx2.PoolTimeout, the proxy's upstream_timeout)",
    )


class DistServeOptions(_Options):
    """Prefill/decode disaggregation: how pairs are connected (LMDeploy's proxy flags).

    `lmdeploy serve proxy --migration-protocol/--link-type/--disable-gdr/--dummy-prefill`
    map onto `migration_protocol`, `link_type`, `with_gdr=not disable_gdr` and
    `dummy_prefill` (docs/distserve.md). LMDeploy 0.18's proxy parses `--disable-gdr`
    but always sends `with_gdr: true`; lmfleet sends what was asked.
    """

    migration_protocol: Literal["RDMA", "NVLINK"] = Field(
        default="RDMA",
        description="KV migration protocol, sent as LMDeploy's MigrationProtocol number "
        "(RDMA 2, NVLINK 3) in p2p_initialize, p2p_connect and migration_request",
    )
    link_type: Literal["RoCE", "IB"] = Field(default="RoCE", description="RDMA link type")
    with_gdr: bool = Field(default=True, description="GPU Direct RDMA (rdma_config.with_gdr)")
    dummy_prefill: bool = Field(
        default=False,
        description="for performance profiling: call no prefill node and connect no "
        "pair; decode nodes get a dummy migration_request (is_dummy_prefill) and "
        "generate without migrating a KV cache",
    )
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
    auto_sleep_after: float | None = Field(
        default=None,
        gt=0,
        description="put a node to sleep after this many seconds without requests "
        "(None: never); a request that finds no awake node wakes one (wake on demand)",
    )
    auto_sleep_level: Literal[1, 2] = Field(default=1, description="LMDeploy sleep level")
    weight_version: int = Field(
        default=0,
        description="the weight version nodes start with; weight updates record newer ones",
    )
    update_timeout: float = Field(
        default=600.0,
        gt=0,
        description="seconds one weight-update call to a node (a bucket, an NCCL step) may take",
    )


class FleetKeywords(TypedDict, total=False):
    """Keyword shortcuts for the most used `FleetOptions` fields.

    `LMFleet.attach`, `simulate` and `launch` accept them beside `options=`; each
    one given overrides its field of `options`.
    """

    health_interval: float
    """`health.interval`; also caps `health.timeout` at the interval (0.5 s minimum)."""
    unhealthy_after: int
    """`health.unhealthy_after`."""
    wait_for_node: float
    """`routing.wait_for_node`."""
    wake_on_demand: bool
    """`routing.wake_on_demand`."""
    first_byte_timeout: float
    """`routing.first_byte_timeout`."""
    min_ready: int
    """`min_ready` (launched fleets default it to their node count)."""
    serving_strategy: ServingStrategy
    """`serving_strategy`."""
    auto_sleep_after: float
    """`auto_sleep_after` (turns on `routing.wake_on_demand`)."""
    admission_queue: int
    """`routing.admission_queue`."""
    weight_version: int
    """`weight_version`: the version the nodes start with."""


_SHORTCUTS: dict[str, tuple[str, ...]] = {
    "health_interval": ("health", "interval"),
    "unhealthy_after": ("health", "unhealthy_after"),
    "wait_for_node": ("routing", "wait_for_node"),
    "wake_on_demand": ("routing", "wake_on_demand"),
    "first_byte_timeout": ("routing", "first_byte_timeout"),
    "min_ready": ("min_ready",),
    "serving_strategy": ("serving_strategy",),
    "auto_sleep_after": ("auto_sleep_after",),
    "admission_queue": ("routing", "admission_queue"),
    "weight_version": ("weight_version",),
}
SHORTCUT_NAMES = frozenset(_SHORTCUTS)


def merge_options(options: FleetOptions | None, shortcuts: Mapping[str, Any]) -> FleetOptions:
    """`options` (or the defaults) with the given keyword shortcuts applied; None skips one."""
    fields = (options or FleetOptions()).model_dump()
    for name, value in shortcuts.items():
        if value is None:
            continue
        *path, leaf = _SHORTCUTS[name]
        section = fields
        for part in path:
            section = section[part]
        section[leaf] = value
        if name == "health_interval":
            section["timeout"] = min(section["timeout"], max(value, 0.5))
        if name == "auto_sleep_after":
            fields["routing"]["wake_on_demand"] = True  # a sleeping fleet must wake on use
    try:
        return FleetOptions.model_validate(fields)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
