"""`LMFleet`: one object that owns the nodes, watches them, and hands out routed clients.

Each fleet owns one background event loop thread (see `background.py`) that runs
the health monitor, the process watcher and admin commands inside one task group.
Sync methods reach it through the portal; the routed clients run in the caller's
own thread or event loop and share the registry with it.
"""

from __future__ import annotations

import atexit
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import httpx2
import openai
from anyio.abc import TaskGroup, TaskStatus

from lmfleet import admin, clients
from lmfleet.background import BackgroundLoop
from lmfleet.config import FleetOptions, HealthOptions, RoutingOptions
from lmfleet.errors import (
    ConfigError,
    FleetClosedError,
    LaunchError,
    NodeCommandError,
    NotReadyError,
    UnknownNodeError,
)
from lmfleet.health import Monitor
from lmfleet.launch.process import ManagedProcess, free_port
from lmfleet.launch.sim import DEFAULT_SIM_MODEL, sim_command
from lmfleet.registry import NodeRegistry, normalize_url
from lmfleet.routing import affinity_key, resolve_strategy
from lmfleet.routing.base import Strategy
from lmfleet.state import NodeRole, NodeState, NodeStatus
from lmfleet.status import FleetStatus, NodeSnapshot
from lmfleet.transport import Router

if TYPE_CHECKING:
    from lmfleet.proxy import ProxyOptions, ProxyServer

_OPEN: weakref.WeakSet[LMFleet] = weakref.WeakSet()


@atexit.register
def _close_open_fleets() -> None:
    """Interpreter exit (a script that forgot `close()`, a kernel shutdown): end every node."""
    for fleet in list(_OPEN):
        fleet.close()


def _merge_options(
    options: FleetOptions | None,
    *,
    health_interval: float | None,
    unhealthy_after: int | None,
    wait_for_node: float | None,
    wake_on_demand: bool | None,
    min_ready: int | None,
) -> FleetOptions:
    """Keyword shortcuts override the matching fields of `options`."""
    base = options or FleetOptions()
    health: dict[str, Any] = {}
    routing: dict[str, Any] = {}
    top: dict[str, Any] = {}
    if health_interval is not None:
        health["interval"] = health_interval
        health["timeout"] = min(base.health.timeout, max(health_interval, 0.5))
    if unhealthy_after is not None:
        health["unhealthy_after"] = unhealthy_after
    if wait_for_node is not None:
        routing["wait_for_node"] = wait_for_node
    if wake_on_demand is not None:
        routing["wake_on_demand"] = wake_on_demand
    if min_ready is not None:
        top["min_ready"] = min_ready
    try:
        return FleetOptions(
            health=HealthOptions(**{**base.health.model_dump(), **health}),
            routing=RoutingOptions(**{**base.routing.model_dump(), **routing}),
            **{**base.model_dump(exclude={"health", "routing"}), **top},
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _exited(code: int) -> Callable[[NodeState], NodeState]:
    def change(state: NodeState) -> NodeState:
        return state.evolve(
            status=NodeStatus.UNHEALTHY, message=f"process exited with status {code}"
        )

    return change


class LMFleet:
    """A fleet of OpenAI-compatible (LMDeploy) nodes with client-side routing.

    Build one with `LMFleet.attach(urls)` or `LMFleet.simulate(nodes=N)`; close it
    with `close()` or a `with` block, which ends every process it started.
    """

    def __init__(
        self,
        *,
        strategy: str | Strategy = "least_connections",
        api_key: str | None = None,
        options: FleetOptions | None = None,
    ) -> None:
        self.options = options or FleetOptions()
        self._api_key = api_key
        self._strategy_name = strategy if isinstance(strategy, str) else type(strategy).__name__
        self.registry = NodeRegistry()
        self.router = Router(
            self.registry,
            resolve_strategy(strategy),
            self.options.routing,
            on_starved=self._starved,
            affinity_key=affinity_key,
        )
        self._processes: dict[str, ManagedProcess] = {}
        self._log_dir: Path | None = None
        self._waking: set[str] = set()
        self._closed = False
        self._stopping: anyio.Event | None = None
        self._tg: TaskGroup | None = None
        self._http: httpx2.AsyncClient | None = None
        self._monitor: Monitor | None = None
        self._loop = BackgroundLoop()
        self._service, _ = self._loop.portal.start_task(self._run_service, name="lmfleet")
        _OPEN.add(self)

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def attach(
        cls,
        urls: Iterable[str],
        *,
        strategy: str | Strategy = "least_connections",
        api_key: str | None = None,
        health_interval: float | None = None,
        unhealthy_after: int | None = None,
        wait_for_node: float | None = None,
        wake_on_demand: bool | None = None,
        min_ready: int | None = None,
        options: FleetOptions | None = None,
    ) -> LMFleet:
        """Route over running servers. `api_key` is the nodes' key (never the proxy's)."""
        merged = _merge_options(
            options,
            health_interval=health_interval,
            unhealthy_after=unhealthy_after,
            wait_for_node=wait_for_node,
            wake_on_demand=wake_on_demand,
            min_ready=min_ready,
        )
        normalized = [normalize_url(u) for u in urls]
        fleet = cls(strategy=strategy, api_key=api_key, options=merged)
        for url in normalized:
            fleet.add_node(url)
        return fleet

    @classmethod
    def simulate(
        cls,
        nodes: int = 3,
        *,
        model: str = DEFAULT_SIM_MODEL,
        speed: float | Sequence[float] = 1.0,
        sim_args: Sequence[str] = (),
        strategy: str | Strategy = "least_connections",
        health_interval: float | None = None,
        unhealthy_after: int | None = None,
        wait_for_node: float | None = None,
        wake_on_demand: bool | None = None,
        min_ready: int | None = None,
        options: FleetOptions | None = None,
    ) -> LMFleet:
        """Start `nodes` emulated LMDeploy servers (`lmfleet sim`) and route over them.

        `speed` scales each node (one value, or one per node: 0.33 is 3x slower);
        `sim_args` are extra `lmfleet sim` flags for every node.
        """
        if nodes < 1:
            raise ConfigError(f"nodes must be >= 1, got {nodes}")
        speeds = [float(speed)] * nodes if isinstance(speed, (int, float)) else list(speed)
        if len(speeds) != nodes:
            raise ConfigError(f"speed has {len(speeds)} values for {nodes} nodes")
        merged = _merge_options(
            options,
            health_interval=health_interval,
            unhealthy_after=unhealthy_after,
            wait_for_node=wait_for_node,
            wake_on_demand=wake_on_demand,
            min_ready=min_ready if min_ready is not None else nodes,
        )
        fleet = cls(strategy=strategy, options=merged)
        try:
            for node_speed in speeds:
                port = free_port()
                argv = sim_command(port, model=model, speed=node_speed, extra=sim_args)
                fleet._launch(f"http://127.0.0.1:{port}", argv)
        except BaseException:
            fleet.close()
            raise
        return fleet

    # -- lifecycle ----------------------------------------------------------------------

    async def _run_service(self, *, task_status: TaskStatus[None]) -> None:
        options = self.options
        limits = httpx2.Limits(max_connections=256, max_keepalive_connections=64)
        async with httpx2.AsyncClient(timeout=options.health.timeout, limits=limits) as http:
            self._http = http
            self._monitor = Monitor(self.registry, options.health, http)
            self._stopping = anyio.Event()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(self._monitor.run)
                tg.start_soon(self._watch_processes)
                task_status.started()
                await self._stopping.wait()
                tg.cancel_scope.cancel()

    def close(self) -> None:
        """End the monitor and every process this fleet started. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        try:
            if self._stopping is not None:
                self._loop.call(self._stopping.set)
            self._service.result(timeout=10)
        finally:
            for proc in self._processes.values():
                proc.terminate(grace=5.0)
            self._loop.stop()

    def __enter__(self) -> LMFleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> LMFleet:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await anyio.to_thread.run_sync(self.close)

    def _check_open(self) -> None:
        if self._closed:
            raise FleetClosedError("this fleet is closed")

    # -- nodes --------------------------------------------------------------------------

    def _launch(self, url: str, argv: list[str]) -> None:
        """Start one node process from the loop thread (so PDEATHSIG outlives callers)."""
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="lmfleet-logs-"))
        log_path = self._log_dir / f"{url.rsplit(':', 1)[-1]}.log"

        def spawn() -> ManagedProcess:
            return ManagedProcess(argv, log_path=log_path)

        self._processes[url] = self._loop.call(spawn)
        self.registry.add(url, api_key=self._api_key, launched=True)
        self._loop.call(self._poke)

    def _poke(self) -> None:
        if self._monitor is not None:
            self._monitor.poke()

    def add_node(
        self,
        url: str,
        *,
        api_key: str | None = None,
        models: Sequence[str] = (),
        role: NodeRole = NodeRole.HYBRID,
        registered: bool = False,
    ) -> NodeSnapshot:
        """Attach one more server; it joins once its health check passes.

        `registered` marks a node that announced itself (LMDeploy's `--proxy-url`
        registers *before* its port opens): like a launched node it stays
        `starting`, never `unhealthy`, until it first answers.
        """
        self._check_open()
        state = self.registry.add(
            url,
            api_key=api_key or self._api_key,
            models=tuple(models),
            role=role,
            launched=registered,
        )
        self._loop.call(self._poke)
        return NodeSnapshot.of(state)

    def remove_node(self, url: str) -> NodeSnapshot:
        """Forget a node at once (requests in flight on it still finish)."""
        state = self.registry.remove(url)
        proc = self._processes.pop(state.url, None)
        if proc is not None:
            proc.terminate()
        return NodeSnapshot.of(state)

    def drain(self, url: str, *, timeout: float | None = None) -> bool:
        """Stop sending `url` new requests and wait for its in-flight ones (bounded).

        The node ends `stopped`; `add_node(url)` brings it back. Returns False when
        requests were still in flight at the timeout.
        """
        self._check_open()
        return self._loop.run(self._drain, url, timeout)

    async def _drain(self, url: str, timeout: float | None = None) -> bool:
        """`drain` for code running in the fleet's loop (the proxy)."""
        url = self.registry.get(url).url
        limit = self.options.drain_timeout if timeout is None else timeout
        return await admin.drain_node(self.registry, url, limit)

    def logs(self, url: str, lines: int = 40) -> str:
        """The tail of a launched node's log."""
        proc = self._processes.get(self.registry.get(url).url)
        if proc is None:
            raise UnknownNodeError(f"{url} was not launched by this fleet: it has no log here")
        return proc.log_tail(lines)

    # -- sleep / wakeup -----------------------------------------------------------------

    def sleep(self, level: int = 1, *, nodes: Sequence[str] | None = None) -> None:
        """Drain, then put nodes to sleep (all, or `nodes`). LMDeploy level 1 or 2."""
        self._check_open()
        self._loop.run(self._sleep_nodes, level, nodes)

    async def _sleep_nodes(self, level: int, nodes: Sequence[str] | None) -> None:
        """`sleep` for code running in the fleet's loop (the proxy)."""
        if level not in (1, 2):
            raise ConfigError(f"sleep level must be 1 or 2, got {level}")
        await self._for_each(self._sleep_one, self._targets(nodes), level)

    def wakeup(
        self, tags: Sequence[str] | None = None, *, nodes: Sequence[str] | None = None
    ) -> None:
        """Wake nodes (all, or `nodes`); `tags` ("weights", "kv_cache") for RL weight updates."""
        self._check_open()
        self._loop.run(self._wake_nodes, tags, nodes)

    async def _wake_nodes(self, tags: Sequence[str] | None, nodes: Sequence[str] | None) -> None:
        """`wakeup` for code running in the fleet's loop (the proxy)."""
        await self._for_each(self._wake_one, self._targets(nodes), tags)

    def _targets(self, nodes: Sequence[str] | None) -> list[str]:
        if nodes is None:
            return [s.url for s in self.registry.snapshot() if s.status is not NodeStatus.STOPPED]
        return [self.registry.get(url).url for url in nodes]

    async def _sleep_one(self, url: str, level: int) -> None:
        assert self._http is not None
        options = self.options
        await admin.sleep_node(
            self._http,
            self.registry,
            url,
            level,
            drain_timeout=options.drain_timeout,
            timeout=options.admin_timeout,
        )

    async def _wake_one(self, url: str, tags: Sequence[str] | None) -> None:
        assert self._http is not None
        await admin.wakeup_node(
            self._http, self.registry, url, tags, timeout=self.options.admin_timeout
        )

    async def _for_each(self, command: Any, urls: list[str], arg: Any) -> None:
        """Run `command(url, arg)` on every node at once; report every failure together."""
        failures: list[str] = []

        async def one(url: str) -> None:
            try:
                await command(url, arg)
            except NodeCommandError as exc:
                failures.append(str(exc))

        async with anyio.create_task_group() as tg:
            for url in urls:
                tg.start_soon(one, url)
        if failures:
            raise NodeCommandError("; ".join(failures))

    def _starved(self, model: str | None) -> None:
        """Called by the router when no node is eligible: wake one if allowed."""
        if not self.options.routing.wake_on_demand or self._closed:
            return
        sleepers = [
            s.url
            for s in self.registry.snapshot()
            if s.status is NodeStatus.SLEEPING
            and s.serves(model)
            and not self.registry.is_held(s.url)
        ]
        if not sleepers or self._waking:
            return
        url = sleepers[0]
        self._waking.add(url)

        async def wake() -> None:
            try:
                await self._wake_one(url, None)
            except NodeCommandError:
                pass  # the waiting request times out with NoHealthyNodeError and says why
            finally:
                self._waking.discard(url)

        if self._loop.in_loop_thread():
            assert self._tg is not None
            self._tg.start_soon(wake)
        else:
            self._loop.portal.start_task_soon(wake)

    async def _watch_processes(self) -> None:
        """Mark a launched node unhealthy as soon as its process exits."""
        reported: set[str] = set()
        while True:
            for url, proc in list(self._processes.items()):
                code = proc.returncode
                if code is not None and url not in reported:
                    reported.add(url)
                    self.registry.modify(url, _exited(code))
            await anyio.sleep(0.25)

    # -- proxy ----------------------------------------------------------------------------

    def serve(
        self,
        port: int | None = None,
        host: str | None = None,
        *,
        api_keys: Sequence[str] | None = None,
        state_file: str | Path | None = None,
        max_body_bytes: int | None = None,
        upstream_timeout: float | None = None,
        options: ProxyOptions | None = None,
    ) -> ProxyServer:
        """Serve this fleet as an HTTP proxy (a drop-in for `lmdeploy serve proxy`).

        Runs in the fleet's background loop (in a notebook the cell returns at once);
        returns a handle with `.url` and `.stop()`. `port` defaults to 8000 (0 picks a
        free one), `host` to 127.0.0.1; keywords override `options`. `api_keys` are
        the keys *clients* must send; the nodes' key stays the fleet's `api_key`.
        See docs/proxy.md.
        """
        self._check_open()
        from lmfleet.proxy import ProxyOptions as Options
        from lmfleet.proxy import start_server

        fields: dict[str, Any] = {}
        if port is not None:
            fields["port"] = port
        if host is not None:
            fields["host"] = host
        if api_keys is not None:
            fields["api_keys"] = tuple(api_keys)
        if state_file is not None:
            fields["state_file"] = Path(state_file)
        if max_body_bytes is not None:
            fields["max_body_bytes"] = max_body_bytes
        if upstream_timeout is not None:
            fields["upstream_timeout"] = upstream_timeout
        base = options.model_dump() if options is not None else {}
        try:
            merged = Options(**{**base, **fields})
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return start_server(self, merged)

    # -- views ----------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 600.0, *, min_ready: int | None = None) -> FleetStatus:
        """Block until at least `min_ready` nodes are healthy; raise with the reason if not."""
        self._check_open()
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.registry.snapshot()
            need = min(min_ready or self.options.min_ready, max(len(nodes), 1))
            healthy = sum(1 for n in nodes if n.status is NodeStatus.HEALTHY)
            if healthy >= need:
                return self.status()
            for url, proc in self._processes.items():
                if (
                    proc.returncode is not None
                    and self.registry.get(url).status is not NodeStatus.HEALTHY
                ):
                    raise LaunchError(
                        f"node {url} exited with status {proc.returncode} before it was ready; "
                        f"log {proc.log_path}:\n{proc.log_tail()}"
                    )
            if time.monotonic() >= deadline:
                raise NotReadyError(
                    f"{healthy} of {need} required nodes healthy after {timeout:g} s\n"
                    f"{self.status().table()}"
                )
            time.sleep(0.05)

    @property
    def nodes(self) -> list[NodeSnapshot]:
        return [NodeSnapshot.of(s) for s in self.registry.snapshot()]

    @property
    def models(self) -> list[str]:
        return self.registry.models()

    @property
    def model(self) -> str:
        """The one served model; an error when there are several or none yet."""
        models = self.models
        if len(models) != 1:
            raise ConfigError(
                f"fleet.model needs exactly one served model, found {models or 'none yet'}; "
                "use fleet.models"
            )
        return models[0]

    def status(self) -> FleetStatus:
        return FleetStatus(strategy=self._strategy_name, models=self.models, nodes=self.nodes)

    def client(self, *, timeout: float | None = None, max_retries: int = 2) -> openai.OpenAI:
        """A real `openai.OpenAI` whose every request is routed to a fleet node."""
        self._check_open()
        return clients.sync_client(self.router, timeout=timeout, max_retries=max_retries)

    def async_client(
        self, *, timeout: float | None = None, max_retries: int = 2
    ) -> openai.AsyncOpenAI:
        """A real `openai.AsyncOpenAI`, usable in any event loop (a notebook's included)."""
        self._check_open()
        return clients.async_client(self.router, timeout=timeout, max_retries=max_retries)

    def __repr__(self) -> str:
        if self._closed:
            return "<LMFleet closed>"
        return self.status().table()
