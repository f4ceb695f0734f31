"""`ProxyOptions`: everything `fleet.serve()` / `lmfleet serve` is configured with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmfleet.config import Flag, with_values

DEFAULT_PUBLIC_PATHS = ("/health", "/liveness", "/readiness", "/metrics")
"""Probes and scrapes, which orchestrators and Prometheus send without a key."""


def count_or_auto(text: str) -> int | str:
    """`--batch-concurrency`'s value: `auto`, or a whole number."""
    return "auto" if text == "auto" else int(text)


class ProxyOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: Annotated[
        str,
        Flag(
            "--server-name",
            aliases=("--host",),
            help="bind address ({default}, this machine only; LMDeploy's proxy defaults to "
            "0.0.0.0: give --server-name 0.0.0.0 for nodes on other hosts)",
        ),
    ] = Field(default="127.0.0.1", description="bind address (LMDeploy: 0.0.0.0)")
    port: Annotated[
        int,
        Flag(
            "--server-port",
            aliases=("--port",),
            help="bind port ({default}; 0 picks a free one)",
            metavar="PORT",
        ),
    ] = Field(default=8000, ge=0, le=65535, description="0 picks a free port")
    api_keys: tuple[str, ...] = Field(
        default=(), description="client keys (Bearer); empty means no auth"
    )
    key_priorities: dict[str, int] = Field(
        default_factory=dict,
        description="a default request priority per client key (lmfleet/priority.py): a "
        "request sent with that key and no priority of its own gets it",
    )
    admin_keys: Annotated[
        tuple[str, ...],
        Flag(
            "--admin-keys",
            help="keys for /nodes/* and /fleet/*; when set, client keys cannot register nodes",
            metavar="KEY",
            absent="default: none, client keys open them",
        ),
    ] = Field(
        default=(),
        description="keys for /nodes/* and /fleet/* (register, remove, sleep...); when set, "
        "client keys no longer open those routes, so no client can register a node",
    )
    public_paths: Annotated[
        tuple[str, ...],
        Flag(
            "--public-paths",
            help="every path that needs no client key: '--public-paths /health "
            "/readiness /metrics /nodes/add' lets LMDeploy nodes started with "
            "--proxy-url register without one, as LMDeploy's proxy does (with "
            "--admin-keys, /nodes/* always needs an admin key)",
            metavar="PATH",
            absent="default: /health /liveness /readiness /metrics",
        ),
    ] = Field(default=DEFAULT_PUBLIC_PATHS, description="paths that need no client key")
    max_body_bytes: Annotated[
        int, Flag("--max-body-bytes", help="request bodies above N bytes get a 413")
    ] = Field(default=100 * 1024 * 1024, ge=1, description="413 above this")
    upstream_timeout: Annotated[
        float | None,
        Flag("--upstream-timeout", help="seconds to wait for a node's next byte before 504"),
    ] = Field(default=600.0, gt=0, description="seconds to wait for a node's next byte (504 after)")
    body_timeout: float = Field(
        default=30.0, gt=0, description="seconds a client may take to send its body (408 after)"
    )
    terminate_timeout: float = Field(default=10.0, gt=0, description="node /terminate timeout")
    fast_lane: Annotated[
        bool,
        Flag(
            "--no-fast-lane",
            help="send every request through the pipeline, plain chat and completions "
            "requests too (the fast lane makes their first attempt itself: "
            "lmfleet/proxy/fast_lane.py); for comparisons and as an escape hatch",
        ),
    ] = Field(
        default=True,
        description="plain chat and completions requests make their first attempt on the "
        "front door's fast lane (lmfleet/proxy/fast_lane.py), not through the pipeline",
    )
    state_file: Path | None = Field(default=None, description="JSON file of registered nodes")
    jobs_dir: Path | None = Field(
        default=None,
        description="Batch API files and jobs (kept across restarts); lmfleet serve: beside "
        "its state file; None: a temporary directory, removed at shutdown",
    )
    batch_concurrency: Annotated[
        int | Literal["auto"],
        Flag(
            "--batch-concurrency",
            help="Batch API lines in flight at once per proxy: N, or auto (as many as the "
            "nodes run, from their /metrics, up to 512)",
            metavar="N|auto",
            parse=count_or_auto,
        ),
    ] = Field(default="auto", description="Batch API lines in flight at once, or auto")

    @field_validator("batch_concurrency")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if value != "auto" and (not isinstance(value, int) or value < 1):
            raise ValueError("batch_concurrency is a number >= 1 or 'auto'")
        return value

    log_level: str = Field(default="info")
    access_log: Annotated[bool, Flag("--access-log")] = Field(
        default=False, description="log every request"
    )
    ssl_keyfile: Path | None = Field(default=None, description="serve HTTPS: the private key")
    ssl_certfile: Path | None = Field(
        default=None, description="serve HTTPS: the certificate (chain), PEM"
    )

    store: Annotated[
        str | None,
        Flag(
            "--store",
            help="share registrations, sleeps, versions and verdicts with the other "
            "replicas of this proxy through Redis at this URL (redis://host:6379/0; needs "
            "lmfleet[store])",
            metavar="URL",
            absent="default: none, nothing shared",
        ),
    ] = Field(
        default=None,
        description="a Redis URL through which replicas on several hosts share the fleet's "
        "decisions (lmfleet/proxy/store.py); None: nothing shared",
    )
    store_name: Annotated[
        str,
        Flag(
            "--store-name",
            help="the key prefix of this proxy's replicas in the store (default {default}): "
            "one Redis can serve several proxies",
        ),
    ] = Field(default="lmfleet", min_length=1, description="the store's key prefix")
    listen_fd: int | None = Field(
        default=None,
        description="serve on this already listening socket (a `lmfleet serve --workers` "
        "worker's, inherited from the supervisor) instead of binding host and port",
    )
    hub: Path | None = Field(
        default=None,
        description="the supervisor's hub (a unix socket) through which `--workers` share "
        "the fleet's decisions (lmfleet/proxy/shared.py; with `store`, only one `/metrics`); "
        "None: one process, nothing shared",
    )
    worker: int = Field(
        default=0,
        ge=0,
        description="this worker's index under `--workers` (0 keeps the state file)",
    )
    workers: int = Field(
        default=1,
        ge=1,
        description="how many workers `--workers` runs (each reads its share of the "
        "nodes' `/metrics`: lmfleet/proxy/shared.py)",
    )

    @model_validator(mode="after")
    def _ssl_pair(self) -> ProxyOptions:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("HTTPS needs both ssl_keyfile and ssl_certfile")
        return self

    @property
    def scheme(self) -> str:
        return "http" if self.ssl_certfile is None else "https"


class ServeKeywords(TypedDict, total=False):
    """`fleet.serve()` shortcuts for the most used `ProxyOptions` fields."""

    api_keys: Sequence[str]
    """Keys clients must send (Bearer); the nodes' key stays the fleet's `api_key`."""
    key_priorities: Mapping[str, int]
    """A default request priority per client key (a batch job's key at -1)."""
    state_file: str | Path
    """JSON file that keeps registered nodes across proxy restarts."""
    max_body_bytes: int
    """Request bodies above this get a 413."""
    upstream_timeout: float
    """Seconds to wait for a node's next byte (504 after)."""
    ssl_keyfile: str | Path
    """Serve HTTPS with this private key (and `ssl_certfile`)."""
    ssl_certfile: str | Path
    """Serve HTTPS with this certificate (and `ssl_keyfile`)."""


def serve_options(
    options: ProxyOptions | None,
    *,
    port: int | None = None,
    host: str | None = None,
    **keywords: Any,
) -> ProxyOptions:
    """`options` (or the defaults) with `fleet.serve()`'s arguments applied; None skips one."""
    for name in keywords:
        if name not in ServeKeywords.__annotations__:
            raise TypeError(f"LMFleet.serve() got an unexpected keyword argument {name!r}")
    given = {"port": port, "host": host, **keywords}
    return with_values(ProxyOptions, options, {(k,): v for k, v in given.items() if v is not None})
