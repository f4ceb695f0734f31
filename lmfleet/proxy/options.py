"""`ProxyOptions`: everything `fleet.serve()` / `lmfleet serve` is configured with."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PUBLIC_PATHS = ("/health", "/metrics")


class ProxyOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(default="127.0.0.1", description="bind address (LMDeploy: 0.0.0.0)")
    port: int = Field(default=8000, ge=0, le=65535, description="0 picks a free port")
    api_keys: tuple[str, ...] = Field(
        default=(), description="client keys (Bearer); empty means no auth"
    )
    admin_keys: tuple[str, ...] = Field(
        default=(),
        description="keys for /nodes/* and /fleet/* (register, remove, sleep...); when set, "
        "client keys no longer open those routes, so no client can register a node",
    )
    public_paths: tuple[str, ...] = Field(
        default=DEFAULT_PUBLIC_PATHS, description="paths that need no client key"
    )
    max_body_bytes: int = Field(default=100 * 1024 * 1024, ge=1, description="413 above this")
    upstream_timeout: float | None = Field(
        default=600.0, gt=0, description="seconds to wait for a node's next byte (504 after)"
    )
    body_timeout: float = Field(
        default=30.0, gt=0, description="seconds a client may take to send its body (408 after)"
    )
    terminate_timeout: float = Field(default=10.0, gt=0, description="node /terminate timeout")
    state_file: Path | None = Field(default=None, description="JSON file of registered nodes")
    log_level: str = Field(default="info")
    access_log: bool = Field(default=False)
