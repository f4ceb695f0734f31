"""`LMFleet`: one object that owns the nodes, watches them, and hands out routed clients.

Each fleet owns one background event loop thread (see `background.py`) that runs
the health monitor, the process watcher and admin commands inside one task group.
Sync methods reach it through the portal; the routed clients run in the caller's
own thread or event loop and share the registry with it.
"""

from __future__ import annotations

import atexit
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import httpx2
import openai
from anyio.abc import TaskGroup, TaskStatus

from lmfleet import clients
from lmfleet.admin import FleetAdmin
from lmfleet.background import BackgroundLoop
from lmfleet.config import FleetOptions, merge_options
from lmfleet.errors import (
    ConfigError,
    FleetClosedError,
    NotReadyError,
    UnknownNodeError,
)
from lmfleet.extras import require_serve
from lmfleet.health import Monitor
from lmfleet.launch import plan
from lmfleet.launch.base import (
    LaunchedNode,
    Launcher,
    NodeSpec,
    Placement,
    RestartMode,
    RestartPolicy,
)
from lmfleet.launch.command import CommandTemplate, ServerArgValue
from lmfleet.launch.sim import DEFAULT_SIM_MODEL
from lmfleet.launch.supervisor import Supervisor
from lmfleet.notebook.methods import NotebookMethods
from lmfleet.registry import NodeRegistry, normalize_url
from lmfleet.routing import affinity_key, resolve_strategy
from lmfleet.routing.base import Strategy
from lmfleet.state import NodeRole, NodeStatus, parse_role
from lmfleet.status import FleetStatus, NodeSnapshot
from lmfleet.transport import Router
from lmfleet.transport.distserve import DistServe

if TYPE_CHECKING:
    from lmfleet.proxy import ProxyOptions, ProxyServer

_OPEN: weakref.WeakSet[LMFleet] = weakref.WeakSet()


@atexit.register
def _close_open_fleets() -> None:
    """Interpreter exit (a script that forgot `close()`, a kernel shutdown): end every node."""
    for fleet in list(_OPEN):
        fleet.close()


class LMFleet(NotebookMethods):
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
        self.registry = NodeRegistry(self.options.outliers)
        self.router = Router(
            self.registry,
            resolve_strategy(strategy),
            self.options.routing,
            on_starved=self._starved,
            affinity_key=affinity_key,
        )
        self.distserve: DistServe | None = None
        """Prefill/decode state in DistServe mode (it routes this fleet's requests)."""
        if self.options.serving_strategy == "DistServe":
            self.distserve = DistServe(self.router, self.options.distserve)
        self._supervisor = Supervisor(self.registry, api_key=api_key, poke=self._poke)
        self._launchers: list[Launcher] = []
        self._closed = False
        self._stopping: anyio.Event | None = None
        self._tg: TaskGroup | None = None
        self._admin: FleetAdmin | None = None
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
        first_byte_timeout: float | None = None,
        options: FleetOptions | None = None,
        serving_strategy: str | None = None,
        roles: Sequence[NodeRole | int | str] | None = None,
    ) -> LMFleet:
        """Route over running servers. `api_key` is the nodes' key (never the proxy's).

        `first_byte_timeout` (seconds, default 300): a node silent that long before
        the first byte of its answer counts as failed and the request goes to another
        node (docs/guide/failover.md); failing answers eject a node for a while.

        `serving_strategy="DistServe"` runs chat/completions prefill -> decode over
        nodes whose `roles` (one per URL: "hybrid", "prefill", "decode" or
        LMDeploy's 1/2/3) say so; see docs/distserve.md.
        """
        merged = merge_options(
            options,
            health_interval=health_interval,
            unhealthy_after=unhealthy_after,
            wait_for_node=wait_for_node,
            wake_on_demand=wake_on_demand,
            first_byte_timeout=first_byte_timeout,
            min_ready=min_ready,
            serving_strategy=serving_strategy,
        )
        normalized = [normalize_url(u) for u in urls]
        node_roles = [NodeRole.HYBRID] * len(normalized) if roles is None else list(roles)
        if len(node_roles) != len(normalized):
            raise ConfigError(f"roles has {len(node_roles)} entries for {len(normalized)} URLs")
        parsed = [parse_role(r) for r in node_roles]
        fleet = cls(strategy=strategy, api_key=api_key, options=merged)
        for url, role in zip(normalized, parsed, strict=True):
            fleet.add_node(url, role=role)
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
        first_byte_timeout: float | None = None,
        options: FleetOptions | None = None,
        launcher: plan.LauncherName = "local",
        restart: RestartMode = "no",
        max_restarts: int = 3,
        base_port: int | None = None,
        ray_address: str | None = None,
        placement: Placement = "spread",
    ) -> LMFleet:
        """Start `nodes` emulated LMDeploy servers (`lmfleet sim`) and route over them.

        The very path `launch` takes, with the simulator's command and no GPUs.
        `speed` scales each node (one value, or one per node: 0.33 is 3x slower);
        `sim_args` are extra `lmfleet sim` flags for every node.
        """
        require_serve("LMFleet.simulate()")
        specs = plan.sim_specs(
            nodes, model=model, speed=speed, sim_args=sim_args, base_port=base_port
        )
        merged = merge_options(
            options,
            health_interval=health_interval,
            unhealthy_after=unhealthy_after,
            wait_for_node=wait_for_node,
            wake_on_demand=wake_on_demand,
            first_byte_timeout=first_byte_timeout,
            min_ready=min_ready if min_ready is not None else nodes,
        )
        policy = RestartPolicy(restart, max_restarts)
        fleet = cls(strategy=strategy, options=merged)
        fleet._start(specs, launcher, policy, None, ray_address, placement)
        return fleet

    @classmethod
    def launch(
        cls,
        model: str,
        nodes: int = 1,
        *,
        tp: int = 1,
        backend: str = "turbomind",
        server_args: Mapping[str, ServerArgValue] | None = None,
        env: Mapping[str, str] | None = None,
        command: CommandTemplate | None = None,
        gpus_per_node: int | None = None,
        launcher: plan.LauncherName = "local",
        restart: RestartMode = "no",
        max_restarts: int = 3,
        base_port: int | None = None,
        log_dir: str | Path | None = None,
        ray_address: str | None = None,
        placement: Placement = "spread",
        strategy: str | Strategy = "least_connections",
        api_key: str | None = None,
        health_interval: float | None = None,
        unhealthy_after: int | None = None,
        wait_for_node: float | None = None,
        wake_on_demand: bool | None = None,
        min_ready: int | None = None,
        first_byte_timeout: float | None = None,
        options: FleetOptions | None = None,
    ) -> LMFleet:
        """Start `nodes` LMDeploy `api_server`s (each on its own `tp` GPUs) and route over them.

        Returns once every process is started (all at once); `wait_ready()` waits
        for them to answer and raises `LaunchError` with a node's log tail if it
        exits first. `server_args` become flags (`{"session_len": 8192}` ->
        `--session-len 8192`); `command` launches another server (a template with
        `{model}` `{host}` `{port}` `{tp}` `{backend}` placeholders, or a callable);
        `gpus_per_node` defaults to `tp`. `launcher="ray"` places nodes as Ray
        actors (`ray_address`, `placement`). `restart="on-failure"` brings a node
        that crashed after it was up back on the same URL, `max_restarts` times.
        See docs/launch.md.
        """
        specs = plan.server_specs(
            model,
            nodes,
            tp=tp,
            backend=backend,
            server_args=server_args,
            env=env,
            command=command,
            gpus_per_node=gpus_per_node,
            base_port=base_port,
        )
        merged = merge_options(
            options,
            health_interval=health_interval,
            unhealthy_after=unhealthy_after,
            wait_for_node=wait_for_node,
            wake_on_demand=wake_on_demand,
            first_byte_timeout=first_byte_timeout,
            min_ready=min_ready if min_ready is not None else nodes,
        )
        policy = RestartPolicy(restart, max_restarts)
        fleet = cls(strategy=strategy, api_key=api_key, options=merged)
        fleet._start(specs, launcher, policy, log_dir, ray_address, placement)
        return fleet

    # -- lifecycle ----------------------------------------------------------------------

    async def _run_service(self, *, task_status: TaskStatus[None]) -> None:
        options = self.options
        limits = httpx2.Limits(max_connections=256, max_keepalive_connections=64)
        async with httpx2.AsyncClient(timeout=options.health.timeout, limits=limits) as http:
            self._admin = FleetAdmin(self.registry, options, http)
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
            try:
                self._supervisor.stop_all(grace=5.0)
                for launcher in self._launchers:
                    launcher.close()
            finally:
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

    def _start(
        self,
        specs: list[NodeSpec],
        launcher_name: plan.LauncherName,
        policy: RestartPolicy,
        log_dir: str | Path | None,
        ray_address: str | None,
        placement: Placement,
    ) -> None:
        """Start every node at once; on any failure end what started and re-raise.

        Local processes are forked by the loop thread (`spawn=self._loop.call`):
        PR_SET_PDEATHSIG is tied to the forking thread, and that one lives as
        long as the fleet.
        """
        try:
            launcher = plan.make_launcher(
                launcher_name,
                policy=policy,
                spawn=self._loop.call,
                log_dir=log_dir,
                ray_address=ray_address,
                placement=placement,
            )
            self._launchers.append(launcher)
            for node in launcher.start(specs):
                self._supervisor.add(node, policy)
            self._loop.call(self._poke)
        except BaseException:
            self.close()
            raise

    @property
    def _processes(self) -> dict[str, LaunchedNode]:
        """The nodes this fleet launched, by URL."""
        return self._supervisor.nodes

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
        node = self._supervisor.remove(state.url)
        if node is not None:
            node.stop()
        return NodeSnapshot.of(state)

    def logs(self, url: str, lines: int = 40) -> str:
        """The tail of a launched node's log."""
        node = self._supervisor.get(self.registry.get(url).url)
        if node is None:
            raise UnknownNodeError(f"{url} was not launched by this fleet: it has no log here")
        return node.log_tail(lines)

    # -- sleep / wakeup (lmfleet/admin.py) ------------------------------------------------

    @property
    def admin(self) -> FleetAdmin:
        """Sleep, wake and drain as coroutines, for code running in the fleet's own loop."""
        self._check_open()
        assert self._admin is not None
        return self._admin

    def sleep(self, level: int = 1, *, nodes: Sequence[str] | None = None) -> None:
        """Drain, then put nodes to sleep (all, or `nodes`). LMDeploy level 1 or 2."""
        self._loop.run(self.admin.sleep, level, nodes)

    def wakeup(
        self, tags: Sequence[str] | None = None, *, nodes: Sequence[str] | None = None
    ) -> None:
        """Wake nodes (all, or `nodes`); `tags` ("weights", "kv_cache") for RL weight updates."""
        self._loop.run(self.admin.wakeup, tags, nodes)

    def drain(self, url: str, *, timeout: float | None = None) -> bool:
        """Stop sending `url` new requests and wait for its in-flight ones (bounded).

        The node ends `stopped`; `add_node(url)` brings it back. Returns False when
        requests were still in flight at the timeout.
        """
        return self._loop.run(self.admin.drain, url, timeout)

    def _starved(self, model: str | None) -> None:
        """Called by the router when no node is eligible: wake one if allowed."""
        if not self.options.routing.wake_on_demand or self._closed or self._admin is None:
            return
        if self._loop.in_loop_thread():
            assert self._tg is not None
            self._tg.start_soon(self._admin.wake_one, model)
        else:
            self._loop.portal.start_task_soon(self._admin.wake_one, model)

    async def _watch_processes(self) -> None:
        """Launched nodes: report exits, restart crashed ones (lmfleet/launch/supervisor.py)."""
        await self._supervisor.run()

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
        require_serve("fleet.serve()")
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
            failure = self._supervisor.failure()
            if failure is not None:
                raise failure
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
