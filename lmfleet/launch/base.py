"""The launcher contract: what a node to start looks like, and what a started node offers.

A `Launcher` turns `NodeSpec`s into `LaunchedNode`s; the fleet's `Supervisor`
watches those nodes, restarts them when asked to, and stops them on close.
Local subprocesses and Ray actors implement the same small surface, so the
simulator, a GPU box and a Ray cluster all go through the one code path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from lmfleet.launch.command import (
    LMDEPLOY_COMMAND,
    CommandContext,
    CommandTemplate,
    ServerArgValue,
    render_command,
)
from lmfleet.plain_errors import ConfigError

RestartMode = Literal["no", "on-failure"]
Placement = Literal["spread", "pack"]


@dataclass(frozen=True)
class NodeSpec:
    """One server to start: its command template and what fills it.

    `gpus` is how many GPUs the node needs (LMDeploy: `tp`; the simulator: 0);
    `port` None lets the launcher pick a free one; `host` None binds 127.0.0.1
    locally and the node's own address on Ray.
    """

    model: str
    index: int = 0
    command: CommandTemplate = LMDEPLOY_COMMAND
    tp: int = 1
    backend: str = "turbomind"
    gpus: int = 1
    server_args: Mapping[str, ServerArgValue] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    port: int | None = None
    host: str | None = None

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    def argv(self, host: str, port: int) -> list[str]:
        context = CommandContext(
            model=self.model,
            host=host,
            port=port,
            tp=self.tp,
            backend=self.backend,
            index=self.index,
        )
        return render_command(
            self.command, context, server_args=self.server_args, extra_args=self.extra_args
        )


@dataclass(frozen=True)
class RestartPolicy:
    """`on-failure`: restart a node that crashed after it was up, bounded, with backoff.

    A node that exits before it ever became healthy is not restarted: a bad flag
    or a missing model fails the same way every time, and `wait_ready` reports
    it with the log tail instead of hiding it behind retries.
    """

    mode: RestartMode = "no"
    max_restarts: int = 3
    backoff: float = 1.0
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        if self.mode not in ("no", "on-failure"):
            raise ConfigError(f"restart must be 'no' or 'on-failure', got {self.mode!r}")
        if self.max_restarts < 0 or self.backoff < 0:
            raise ConfigError("max_restarts and restart backoff must be >= 0")

    def delay(self, attempt: int) -> float:
        """Seconds before restart number `attempt` (0-based): exponential, capped."""
        return float(min(self.backoff_max, self.backoff * (2**attempt)))


@runtime_checkable
class LaunchedNode(Protocol):
    """One started server, wherever it runs.

    `poll()` may block briefly (a Ray round trip): the supervisor calls it from
    a worker thread. `restart()` brings the server back on the same port when
    the launcher can, so its URL stays the same.
    """

    @property
    def url(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def log_path(self) -> str: ...

    @property
    def argv(self) -> list[str]:
        """The command line the server runs (what a weight update's preflight reads)."""
        ...

    def poll(self) -> int | None:
        """None while the server runs; its exit status once it has ended."""
        ...

    def log_tail(self, lines: int = 40) -> str: ...

    def restart(self) -> None: ...

    def stop(self, grace: float = 5.0) -> None: ...


class Launcher(Protocol):
    """Starts nodes (all at once, without waiting for readiness) and owns their backend."""

    def start(self, specs: list[NodeSpec]) -> list[LaunchedNode]: ...

    def close(self) -> None:
        """Release what the launcher itself holds (a Ray session it started)."""
        ...
