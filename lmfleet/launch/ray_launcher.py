"""Nodes as Ray actors: one actor per node, each running its server next to it.

The actor reserves the node's GPUs (`num_gpus=tp`; Ray sets the actor's
`CUDA_VISIBLE_DEVICES`, which the server inherits), picks a free port on its
own host, starts the server as a `ManagedProcess` (so PR_SET_PDEATHSIG ends the
server when the actor process dies, even by SIGKILL) and reports
`http://<node-ip>:<port>`, with the node IP from Ray itself, never from
interface guessing. Ray restarts a dead actor up to `max_restarts` times; the
restarted actor may pick another port, and the supervisor follows the new URL.

Ray is imported only when this launcher is used (lmfleet's `ray` extra installs it).
"""

from __future__ import annotations

import atexit
import contextlib
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lmfleet.launch.base import LaunchedNode, NodeSpec, Placement
from lmfleet.launch.process import ManagedProcess, free_port
from lmfleet.plain_errors import ConfigError, LaunchError, install_hint

ACTOR_DIED = -1
"""`poll()` status of a node whose actor is dead for good."""


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"launcher='ray' needs Ray: {install_hint('ray')}") from exc
    return ray


class NodeActor:
    """Runs inside the Ray actor process: one server, its log, its end."""

    def __init__(self, spec: NodeSpec, log_dir: str) -> None:
        ray = _ray()
        ip = str(ray.util.get_node_ip_address())
        host = spec.host or ip
        self._port = spec.port or free_port(host)
        url_host = ip if host in ("0.0.0.0", "") else host
        self._url = f"http://{url_host}:{self._port}"
        self._spec = spec
        self._argv = spec.argv(host, self._port)
        self._log = Path(log_dir) / f"{spec.name}-{self._port}.log"
        self._proc = self._spawn()
        atexit.register(self.stop)

    def _spawn(self) -> ManagedProcess:
        return ManagedProcess(self._argv, log_path=self._log, env=dict(self._spec.env))

    def info(self) -> tuple[str, int | None, int, str]:
        return self._url, self._proc.returncode, self._proc.pid, str(self._log)

    def log_tail(self, lines: int = 40) -> str:
        return self._proc.log_tail(lines)

    def ensure_running(self) -> None:
        """Start the server again on the same port if it has exited (idempotent)."""
        if self._proc.returncode is not None:
            with open(self._log, "a") as log:
                log.write("\n--- lmfleet: restart ---\n")
            self._proc = self._spawn()

    def stop(self, grace: float = 5.0) -> None:
        self._proc.terminate(grace=grace)


class RayNode:
    """The driver's handle on one node actor."""

    def __init__(self, launcher: RayLauncher, index: int, spec: NodeSpec, group: Any) -> None:
        self._launcher = launcher
        self._index = index
        self._spec = spec
        self._group = group
        self.actor = launcher.new_actor(index, spec, group)
        self.restarting = False
        self._dead = False
        self._url = ""
        self._pid: int | None = None
        self._log_path = ""
        self._last_tail = ""

    def refresh(self, timeout: float) -> None:
        url, _, pid, log_path = _ray().get(self.actor.info.remote(), timeout=timeout)
        self._url, self._pid, self._log_path = url, pid, log_path

    @property
    def url(self) -> str:
        return self._url

    @property
    def argv(self) -> list[str]:
        """The actor's command line, rendered here from the same spec (its host as the
        node's URL names it: the actor binds 0.0.0.0 to the same port when told to)."""
        parts = urlsplit(self._url)
        return self._spec.argv(parts.hostname or "", parts.port or 0)

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def log_path(self) -> str:
        return self._log_path

    def poll(self) -> int | None:
        ray = _ray()
        exceptions = ray.exceptions
        unavailable = getattr(exceptions, "ActorUnavailableError", ())
        if self._dead:
            return ACTOR_DIED
        try:
            url, code, pid, log_path = ray.get(
                self.actor.info.remote(), timeout=self._launcher.poll_timeout
            )
        except unavailable:
            self.restarting = True
            return None
        except exceptions.GetTimeoutError:
            return None  # busy or slow: decide on the next poll
        except exceptions.RayActorError:
            self.restarting, self._dead = False, True
            return ACTOR_DIED
        self.restarting = False
        self._url, self._pid, self._log_path = url, pid, log_path
        return int(code) if code is not None else None

    def log_tail(self, lines: int = 40) -> str:
        ray = _ray()
        try:
            self._last_tail = str(
                ray.get(self.actor.log_tail.remote(lines), timeout=self._launcher.poll_timeout)
            )
        except ray.exceptions.RayError:
            return f"{self._last_tail}\n(actor unavailable: last known log tail)".lstrip()
        return self._last_tail

    def restart(self) -> None:
        """Server exited in a live actor: start it again; actor gone for good: a new actor."""
        if self._dead:
            self.actor = self._launcher.new_actor(self._index, self._spec, self._group)
            self._dead = False
            self.restarting = True
            return
        self.actor.ensure_running.remote()

    def stop(self, grace: float = 5.0) -> None:
        ray = _ray()
        # An actor already dead took its server with it (PR_SET_PDEATHSIG).
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(self.actor.stop.remote(grace), timeout=grace + 10)
        ray.kill(self.actor, no_restart=True)


class RayLauncher:
    """Nodes on a Ray cluster: `address` to join one, else a local one (if none is running).

    `placement` "spread" puts nodes on different machines where it can (more
    aggregate memory bandwidth, fewer shared failures); "pack" fills machines
    one by one (leaves whole machines free for other jobs).
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        placement: Placement = "spread",
        max_restarts: int = 0,
        log_dir: str | None = None,
        ready_timeout: float = 120.0,
        poll_timeout: float = 5.0,
    ) -> None:
        if placement not in ("spread", "pack"):
            raise ConfigError(f"placement must be 'spread' or 'pack', got {placement!r}")
        self.address = address
        self.placement = placement
        self.max_restarts = max_restarts
        self.log_dir = log_dir or str(
            Path(tempfile.gettempdir()) / f"lmfleet-ray-logs-{uuid.uuid4().hex[:8]}"
        )
        self.ready_timeout = ready_timeout
        self.poll_timeout = poll_timeout
        self._owns_ray = False
        self._groups: list[Any] = []
        self._actor_class: Any = None

    def start(self, specs: list[NodeSpec]) -> list[LaunchedNode]:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=self.address)
            self._owns_ray = True
        from ray.util.placement_group import placement_group

        bundles = [{"CPU": 1.0, **({"GPU": float(s.gpus)} if s.gpus else {})} for s in specs]
        group = placement_group(bundles, strategy=self.placement.upper())
        self._groups.append(group)
        try:
            ray.get(group.ready(), timeout=self.ready_timeout)
        except ray.exceptions.GetTimeoutError as exc:
            raise LaunchError(
                f"the Ray cluster cannot place {len(specs)} node(s) ({bundles[0]} each) "
                f"within {self.ready_timeout:g} s: {ray.cluster_resources()} in total"
            ) from exc
        self._actor_class = ray.remote(NodeActor)
        nodes = [RayNode(self, i, spec, group) for i, spec in enumerate(specs)]
        try:
            for node in nodes:
                node.refresh(self.ready_timeout)
        except ray.exceptions.RayError as exc:
            for node in nodes:
                ray.kill(node.actor, no_restart=True)
            raise LaunchError(f"a node actor failed to start: {exc}") from exc
        return list(nodes)

    def new_actor(self, index: int, spec: NodeSpec, group: Any) -> Any:
        """A node actor in bundle `index` of `group` (a replacement reuses the bundle)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=index
        )
        return self._actor_class.options(
            num_cpus=1,
            num_gpus=spec.gpus,
            max_restarts=self.max_restarts,
            scheduling_strategy=strategy,
        ).remote(spec, self.log_dir)

    def close(self) -> None:
        ray = _ray()
        if not ray.is_initialized():
            return
        from ray.util.placement_group import remove_placement_group

        for group in self._groups:
            with contextlib.suppress(Exception):  # best effort while tearing down
                remove_placement_group(group)
        self._groups.clear()
        if self._owns_ray:
            ray.shutdown()
