"""Nodes as subprocesses of this machine, one contiguous GPU group each.

Processes are spawned through `spawn`, which the fleet points at its
long-lived loop thread: PR_SET_PDEATHSIG fires when the *thread* that forked
exits, so spawning from a short-lived thread would kill the node with it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lmfleet.launch.base import LaunchedNode, NodeSpec
from lmfleet.launch.gpus import assign_gpus, visible_gpus
from lmfleet.launch.process import ManagedProcess, free_port
from lmfleet.plain_errors import LaunchError

T = TypeVar("T")
Spawner = Callable[[Callable[[], T]], T]

LOCAL_HOST = "127.0.0.1"


def _direct(func: Callable[[], T]) -> T:
    return func()


class LocalNode:
    """One server subprocess; `restart()` runs the same argv again (same port, same URL)."""

    def __init__(
        self,
        argv: list[str],
        *,
        url: str,
        log_path: Path,
        env: dict[str, str],
        spawn: Spawner[ManagedProcess] = _direct,
    ) -> None:
        self.argv = argv
        self.env = env
        self._url = url
        self._log_path = log_path
        self._spawn = spawn
        self.restarts = 0
        self.process = self._spawn(self._new_process)

    def _new_process(self) -> ManagedProcess:
        return ManagedProcess(self.argv, log_path=self._log_path, env=self.env)

    @property
    def url(self) -> str:
        return self._url

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def log_path(self) -> str:
        return str(self._log_path)

    def poll(self) -> int | None:
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)

    def restart(self) -> None:
        self.process.terminate(grace=5.0)
        self.restarts += 1
        with open(self._log_path, "a") as log:
            log.write(f"\n--- lmfleet: restart {self.restarts} ---\n")
        self.process = self._spawn(self._new_process)

    def stop(self, grace: float = 5.0) -> None:
        self.process.terminate(grace=grace)


class LocalLauncher:
    """Start every node at once on this machine; GPUs are split before anything starts."""

    def __init__(self, *, log_dir: Path | None = None, spawn: Spawner[ManagedProcess] = _direct):
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="lmfleet-logs-"))
        self._spawn = spawn

    def start(self, specs: list[NodeSpec]) -> list[LaunchedNode]:
        groups: list[list[str]] = [[] for _ in specs]
        if any(spec.gpus for spec in specs):
            environ = {**os.environ, **specs[0].env}
            groups = assign_gpus([spec.gpus for spec in specs], visible_gpus(environ))
        started: list[LaunchedNode] = []
        try:
            for spec, group in zip(specs, groups, strict=False):
                started.append(self._start_one(spec, group))
        except OSError as exc:
            for node in started:
                node.stop(grace=2.0)
            raise LaunchError(f"could not start {specs[len(started)].name}: {exc}") from exc
        return started

    def _start_one(self, spec: NodeSpec, gpus: list[str]) -> LocalNode:
        host = spec.host or LOCAL_HOST
        port = spec.port or free_port(host)
        env = dict(spec.env)
        if spec.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        url_host = LOCAL_HOST if host in ("0.0.0.0", "") else host
        return LocalNode(
            spec.argv(host, port),
            url=f"http://{url_host}:{port}",
            log_path=self.log_dir / f"{spec.name}-{port}.log",
            env=env,
            spawn=self._spawn,
        )

    def close(self) -> None:
        """Nothing to release: every node is stopped by its own `stop()`."""
