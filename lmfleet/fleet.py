"""`LMFleet`: one object that owns the nodes, watches them, and hands out routed clients.

The facade over the layers below it (docs/architecture.md): the registry and the
router (shared by the clients and the proxy), the health monitor, the launched
processes' supervisor, and the fleet's runtime, one background event loop thread
whose task group runs the monitor, the supervisor, admin commands and the proxy.
Sync methods reach that loop through the runtime; the routed clients run in the
caller's own thread or event loop and share the registry with it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import httpx2
import openai
from anyio.abc import TaskStatus

from lmfleet.config import FleetKeywords, FleetOptions, NodeOptions, merge_options
from lmfleet.errors import ConfigError, NotReadyError, require_serve
from lmfleet.launch.methods import LaunchMethods
from lmfleet.launch.options import split_keywords
from lmfleet.launch.supervisor import Supervisor
from lmfleet.monitor.autosleep import AutoSleep
from lmfleet.monitor.loop import Monitor
from lmfleet.node.admin import FleetAdmin
from lmfleet.node.client import NodeClient
from lmfleet.node.profile import parse_engine
from lmfleet.node.state import NodeRole, NodeStatus, parse_roles, parse_speed, parse_speeds
from lmfleet.node.views import FleetStatus, NodeSnapshot
from lmfleet.notebook.methods import NotebookMethods
from lmfleet.proxy.options import ProxyOptions, ServeKeywords, serve_options
from lmfleet.registry import NodeRegistry, normalize_url
from lmfleet.routing import (
    DEFAULT_STRATEGY,
    Decision,
    RequestInfo,
    affinity_key,
    as_base_strategy,
    resolve_strategy,
)
from lmfleet.routing.base import Strategy
from lmfleet.routing.tiers import parse_priorities, parse_priority
from lmfleet.runtime import FleetRuntime
from lmfleet.transport import Planner, Router, clients
from lmfleet.transport.distserve import DistServe
from lmfleet.weights.methods import WeightMethods
from lmfleet.weights.session import WeightUpdater

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from lmfleet.proxy.server import ProxyServer


class LMFleet(LaunchMethods, NotebookMethods, WeightMethods):
    """A fleet of OpenAI-compatible (LMDeploy) nodes with client-side routing.

    Build one with `LMFleet.attach(urls)`, `LMFleet.simulate(nodes=N)` or
    `LMFleet.launch(model, N)`; close it with `close()` or a `with` block, which
    ends every process it started.
    """

    def __init__(
        self,
        *,
        strategy: str | Strategy = DEFAULT_STRATEGY,
        api_key: str | None = None,
        options: FleetOptions | None = None,
    ) -> None:
        self.options = options or FleetOptions()
        self._api_key = api_key
        self._strategy_name = strategy if isinstance(strategy, str) else type(strategy).__name__
        self.registry = NodeRegistry(
            self.options.outliers,
            weight_version=self.options.weight_version,
            spill_margin=self.options.routing.spill_margin,
            aliases={alias: tuple(names) for alias, names in self.options.aliases.items()},
            unify_models=self.options.unify_models,
        )
        self._supervisor = Supervisor(self.registry, api_key=api_key, poke=self._poke)
        self.runtime = FleetRuntime(on_close=self._supervisor.close)
        """The fleet's event loop and task group: run your own background work beside
        the monitor with `fleet.runtime.start_soon(...)` (lmfleet/runtime.py)."""
        limits = httpx2.Limits(max_connections=256, max_keepalive_connections=64)
        # Straight to the nodes, as the routed requests go: a client given its
        # transport reads no proxy from the environment (a cluster's `http_proxy`
        # must not make healthy nodes look dead), while the transport still reads
        # `SSL_CERT_FILE` for nodes served over HTTPS, as the routed ones do.
        self._http = httpx2.AsyncClient(
            timeout=self.options.health.timeout, transport=httpx2.AsyncHTTPTransport(limits=limits)
        )
        nodes = NodeClient(self._http)
        # Built in the loop thread: they create anyio primitives bound to that loop.
        self._admin = self.runtime.call(
            FleetAdmin, self.registry, self.options, nodes, self.runtime
        )
        self.router = Router(
            self.registry,
            resolve_strategy(strategy),
            self.options.routing,
            on_starved=self._admin.starved,  # wake on demand
            affinity_key=affinity_key,
            closed=lambda: self.closed,
            nodes=nodes,
        )
        self.distserve = (
            DistServe(self.router, self.options.distserve)
            if self.options.serving_strategy == "DistServe"
            else None
        )
        """Prefill/decode state in DistServe mode."""
        self.planner: Planner = self.distserve or self.router
        """The serving mode every transport of this fleet drives (`transport.Planner`):
        the router, or DistServe over it; fixed when the fleet is built."""
        self._monitor = self.runtime.call(
            partial(Monitor, routes_on_load=as_base_strategy(self.router.strategy).uses_node_load),
            self.registry,
            self.options.health,
            nodes,
        )
        after = self.options.auto_sleep_after
        self._auto_sleep = (
            AutoSleep(self.registry, self._admin, after=after, level=self.options.auto_sleep_level)
            if after is not None
            else None
        )
        self._updater = self.runtime.call(
            WeightUpdater, self.registry, nodes, self.options, self._launch_argv
        )
        self.runtime.start(self._watch, name="lmfleet monitor")

    @classmethod
    def attach(
        cls,
        urls: Iterable[str],
        *,
        strategy: str | Strategy = DEFAULT_STRATEGY,
        api_key: str | None = None,
        options: FleetOptions | None = None,
        roles: Sequence[NodeRole | int | str] | None = None,
        speeds: Sequence[float | None] | None = None,
        priorities: Sequence[int] | None = None,
        node_options: Mapping[str, NodeOptions | Mapping[str, Any] | None] | None = None,
        engine: str = "auto",
        allow_empty: bool = False,
        **shortcuts: Unpack[FleetKeywords],
    ) -> LMFleet:
        """Route over running servers. `api_key` is the nodes' key (never the proxy's).

        `urls` is a list of `http(s)://host[:port]` (a single string is one URL); every
        one is checked before anything starts (`ConfigError` shows the bad one). An
        empty list is a `ConfigError` too, as it is almost always a mistake, unless
        `allow_empty=True`: a proxy whose nodes register later (`add_node`, or
        LMDeploy's `--proxy-url` at /nodes/add).

        `shortcuts` override fields of `options`, each the field it is named after
        (`config.FleetKeywords`; idle auto-sleep and the admission queue:
        docs/guide/sleep.md). A node silent for `first_byte_timeout` seconds before its
        answer's first byte fails over (docs/guide/failover.md).
        `serving_strategy="DistServe"` runs prefill -> decode over nodes whose `roles`
        (one per URL: hybrid/prefill/decode or LMDeploy's 1/2/3) say so (docs/distserve.md).
        `speeds` (one per URL, LMDeploy's `speed`: 2.0 is twice as fast) tell
        `least_load` and `prefix_affinity` how the nodes compare; without them the
        fleet learns it from latency (docs/guide/strategies.md). `priorities` (one
        integer per URL, higher preferred, as Olla's) rank the nodes in tiers: a lower
        tier gets requests only when the better one is short of healthy nodes or busy
        (docs/guide/strategies.md, "Priority tiers"). `node_options` gives nodes
        their own settings, by URL (`NodeOptions`: key, extra headers, health path,
        interval and timeout; docs/guide/concepts.md, "Per-node settings").
        `engine`: the nodes' engine, "lmdeploy", "vllm", "sglang" or "openai" (any other
        OpenAI-compatible server: routing and health only); default "auto": each node's
        is recognised from its own `/v1/models`, so one fleet may mix engines
        (`node_options` can name one node's; docs/guide/engines.md).
        """
        # Everything is checked before the fleet starts its thread: a bad URL must not
        # leave a half-built fleet running.
        urls = [normalize_url(url) for url in ([urls] if isinstance(urls, str) else urls)]
        if not urls and not allow_empty:
            raise ConfigError(
                "LMFleet.attach got no node URLs; give at least one "
                "(LMFleet.attach(['http://127.0.0.1:23333'])), or pass allow_empty=True "
                "for a fleet whose nodes are added later"
            )
        split_keywords(shortcuts, "LMFleet.attach", launch=False)
        forced = parse_engine(engine, "LMFleet.attach")
        parsed = parse_roles(roles, len(urls))
        given = parse_speeds(speeds, len(urls))
        tiers = parse_priorities(priorities, len(urls)) if priorities is not None else None
        own = {normalize_url(u): as_node_options(o, u) for u, o in (node_options or {}).items()}
        if unknown := own.keys() - set(urls):
            raise ConfigError(f"node_options names URLs not attached: {', '.join(sorted(unknown))}")
        for settings in own.values():
            if settings is not None:
                settings.secrets()  # a variable not set is an error before anything starts
        fleet = cls(strategy=strategy, api_key=api_key, options=merge_options(options, shortcuts))
        for index, (url, role, speed) in enumerate(zip(urls, parsed, given, strict=True)):
            priority = tiers[index] if tiers is not None else None  # else its options'
            settings = own.get(url)
            mine = settings.engine if settings is not None and settings.engine else None
            fleet.add_node(
                url,
                role=role,
                speed=speed,
                priority=priority,
                options=settings,
                engine=mine or forced or "auto",
            )
        return fleet

    async def _watch(self, *, task_status: TaskStatus[None]) -> None:
        """Health monitor, process supervisor and idle auto-sleep, until the runtime
        cancels them."""
        async with self._http, anyio.create_task_group() as tg:
            await tg.start(self._monitor.run)
            tg.start_soon(self._supervisor.run)
            if self._auto_sleep is not None:
                await tg.start(self._auto_sleep.run)
            task_status.started()

    @property
    def closed(self) -> bool:
        return self.runtime.closed

    def close(self) -> None:
        """End the monitor and every process this fleet started. Idempotent.

        Also run at interpreter exit for a fleet never closed (lmfleet/runtime.py).
        """
        self.runtime.close()

    def __enter__(self) -> LMFleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> LMFleet:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await anyio.to_thread.run_sync(self.close)

    def _poke(self) -> None:
        """Make the monitor re-read the node list now (from any thread)."""
        self.runtime.call(self._monitor.poke)

    def add_node(
        self,
        url: str,
        *,
        api_key: str | None = None,
        models: Sequence[str] = (),
        role: NodeRole = NodeRole.HYBRID,
        registered: bool = False,
        speed: float | None = None,
        priority: int | None = None,
        weight_version: int | None = None,
        origin: str | None = None,
        options: NodeOptions | Mapping[str, Any] | None = None,
        engine: str | None = None,
    ) -> NodeSnapshot:
        """Attach one more server; it joins once its health check passes.

        `registered`: the node announced itself (LMDeploy's `--proxy-url` registers
        *before* its port opens), so it stays `starting` until it first answers.
        `speed`: its relative speed (LMDeploy's `speed`: 2.0 is twice as fast), used
        by `least_load` and `prefix_affinity` when every candidate has one; otherwise
        the fleet learns the nodes' speeds from their latency. `priority`: its tier,
        higher preferred (default 0; a node added again keeps its own). `weight_version`: the
        version it serves, when known (a proxy's state file remembers it; default the
        fleet's). `origin`: who added it, for the log line that reports its arrival
        (default: "attached", or "registered itself" with `registered`). `options`:
        its own settings (`NodeOptions`, or a dict of its fields): key, extra headers,
        health path, interval and timeout, priority, speed, engine; `api_key`,
        `speed`, `priority` and `engine` given here win over theirs. `engine`:
        "lmdeploy", "vllm", "sglang" or "openai" (any other OpenAI-compatible server:
        routing and health only); default "auto", recognised from its `/v1/models`
        when it first answers (docs/guide/engines.md).
        """
        self.runtime.check_open()
        settings = as_node_options(options, url)
        if engine is None and settings is not None:
            engine = settings.engine
        key, headers = settings.secrets() if settings is not None else (None, ())
        if priority is None and settings is not None:
            priority = settings.priority
        if speed is None and settings is not None:
            speed = settings.speed
        state = self.registry.add(
            url,
            api_key=api_key or key or self._api_key,
            models=tuple(models),
            role=role,
            registered=registered,
            speed=parse_speed(speed, "add_node"),
            priority=None if priority is None else parse_priority(priority, "add_node"),
            weight_version=weight_version,
            origin=origin,
            headers=headers if settings is not None else None,
            options=settings,
            engine=parse_engine(engine, "add_node"),
        )
        self._poke()
        return NodeSnapshot.of(state)

    def remove_node(self, url: str) -> NodeSnapshot:
        """Forget a node at once (requests in flight on it still finish)."""
        state = self.registry.remove(url)
        node = self._supervisor.remove(state.url)
        if node is not None:
            node.stop()
        return NodeSnapshot.of(state)

    @property
    def admin(self) -> FleetAdmin:
        """Sleep, wake and drain as coroutines, for code running in the fleet's own loop."""
        self.runtime.check_open()
        return self._admin

    def sleep(self, level: int = 1, *, nodes: Sequence[str] | str | None = None) -> None:
        """Drain, then put nodes to sleep (all, or `nodes`). LMDeploy level 1 or 2."""
        self.runtime.run(self.admin.sleep, level, nodes)

    def wakeup(
        self, tags: Sequence[str] | str | None = None, *, nodes: Sequence[str] | str | None = None
    ) -> None:
        """Wake nodes (all, or `nodes`); `tags` ("weights", "kv_cache") for RL weight updates."""
        self.runtime.run(self.admin.wakeup, tags, nodes)

    def abort(
        self, request_id: str | None = None, *, nodes: Sequence[str] | str | None = None
    ) -> list[str]:
        """Abort one request (`request_id`: its answer's `x-lmfleet-request-id`; a
        `/generate` the fleet follows) or every request in flight on nodes (all, or
        `nodes`): their callers get what was generated so far, ended with
        `finish_reason: "abort"`. Returns the URLs aborted on; `UnknownRequestError`
        for an id it cannot abort, `NodeCommandError` naming each node that could not
        (an LMDeploy node aborts only when started with `--enable-abort-handling`)."""
        return self.runtime.run(self.admin.abort, nodes, request_id)

    def drain(self, url: str, *, timeout: float | None = None) -> bool:
        """Stop sending `url` new requests and wait for its in-flight ones (bounded).

        The node ends `stopped`; `add_node(url)` brings it back. Returns False when
        requests were still in flight at the timeout.
        """
        return self.runtime.run(self.admin.drain, url, timeout)

    def serve(
        self,
        port: int | None = None,
        host: str | None = None,
        *,
        options: ProxyOptions | None = None,
        **keywords: Unpack[ServeKeywords],
    ) -> ProxyServer:
        """Serve this fleet as an HTTP proxy (a drop-in for `lmdeploy serve proxy`).

        Runs in the fleet's background loop (in a notebook the cell returns at once);
        returns a handle with `.url` and `.stop()` (or `with fleet.serve() as server:`,
        stopped at the block's end). `port` defaults to 8000 (0 picks a
        free one), `host` to 127.0.0.1; `keywords` (`api_keys`, `state_file`,
        `max_body_bytes`, `upstream_timeout`) override `options`. `api_keys` are the
        keys *clients* must send; the nodes' key stays the fleet's `api_key`.
        See docs/proxy.md.
        """
        self.runtime.check_open()
        require_serve("fleet.serve()")
        from lmfleet.proxy.server import start_server

        return start_server(self, serve_options(options, port=port, host=host, **keywords))

    def wait_ready(self, timeout: float = 600.0, *, min_ready: int | None = None) -> FleetStatus:
        """Block until at least `min_ready` nodes are healthy; raise with the reason if not.

        A `min_ready` given here is waited for even beyond the nodes the fleet has
        now: nodes that register (`allow_empty`, `/nodes/add`) or are added count.
        The fleet's own (`FleetOptions.min_ready`) is capped at its node count, so a
        fleet whose node was removed is still ready with the rest."""
        self.runtime.check_open()
        if min_ready is not None and min_ready < 1:
            raise ConfigError(f"min_ready must be >= 1, got {min_ready}")
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.registry.snapshot()
            need = min_ready or min(self.options.min_ready, max(len(nodes), 1))
            healthy = sum(1 for n in nodes if n.status is NodeStatus.HEALTHY)
            if healthy >= need:
                return self.status()
            if (failure := self._supervisor.failure()) is not None:
                raise failure
            if time.monotonic() >= deadline:
                raise NotReadyError(_not_ready(self.status(), healthy, need, timeout))
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

    def explain(
        self, model: str | None = None, *, messages: list[dict[str, Any]] | None = None
    ) -> Decision:
        """Which node the next request for `model` would go to now, and why.

        Every eligible node with the strategy's score for it (`least_load`: the
        expected seconds, from the requests on the node and its speed) and the reason
        in words. `messages` gives prefix affinity the prompt it would hash. Nothing
        is sent or leased, but a rotating strategy's turn moves, as for a request.
        """
        body = {"messages": messages} if messages is not None else None
        strategy = as_base_strategy(self.router.strategy)
        key = affinity_key({}, body) if strategy.uses_affinity_key else None
        request = RequestInfo(model=model, affinity_key=key)
        return self.registry.explain(self.router.strategy, request)

    def client(self, *, timeout: float | None = None, max_retries: int = 2) -> openai.OpenAI:
        """A real `openai.OpenAI` whose every request is routed to a fleet node."""
        self.runtime.check_open()
        return clients.sync_client(
            self.planner, self.options.routing, timeout=timeout, max_retries=max_retries
        )

    def async_client(
        self, *, timeout: float | None = None, max_retries: int = 2
    ) -> openai.AsyncOpenAI:
        """A real `openai.AsyncOpenAI`, usable in any event loop (a notebook's included)."""
        self.runtime.check_open()
        return clients.async_client(
            self.planner, self.options.routing, timeout=timeout, max_retries=max_retries
        )

    def __repr__(self) -> str:
        if self.runtime.closed:
            return "<LMFleet closed>"
        return self.status().table()


def as_node_options(
    options: NodeOptions | Mapping[str, Any] | None, url: str
) -> NodeOptions | None:
    """`options` as `NodeOptions` (a dict of its fields is accepted); `ConfigError`
    naming the node for a bad one."""
    if options is None or isinstance(options, NodeOptions):
        return options
    try:
        return NodeOptions(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"node_options for {url}: {exc}") from None


def _not_ready(status: FleetStatus, healthy: int, need: int, timeout: float) -> str:
    """`wait_ready`'s error: why each node is not ready first, then the whole table.

    The reason (connection refused, a 503, a launch still loading) is what the
    reader must act on, so it leads, one line per node that is not healthy.
    """
    head = f"{healthy} of {len(status.nodes)} nodes healthy after {timeout:g} s ({need} needed)"
    if not status.nodes:
        head += ": the fleet has no nodes (add_node, or a node registering at /nodes/add)"
    reasons = [
        f"  {n.url}: {n.reason()}" for n in status.nodes if n.state is not NodeStatus.HEALTHY
    ]
    return "\n".join([head + (":" if reasons else ""), *reasons, "", status.table(notes=False)])
