"""`create_app(fleet)`: the proxy as a thin raw-ASGI app over the fleet's router.

Dispatch is one dict lookup; every POST under `/v1/` (plus `/generate` and
`/pooling`) is forwarded raw by `forward.py`. Per-app objects (the upstream
transport, the metrics) live in the lifespan state, never in module globals.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

import lmfleet.answers as answers
from lmfleet.errors import (
    ConfigError,
    NodeCommandError,
    UnknownNodeError,
    UnknownObjectError,
    UnknownRequestError,
)
from lmfleet.proxy import admin_api, batch_api, distserve_api, nodes_api
from lmfleet.proxy.asgi import (
    BodyTimeout,
    BodyTooLarge,
    ClientGone,
    Receive,
    Scope,
    Send,
)
from lmfleet.proxy.batch_api import BatchJobs
from lmfleet.proxy.context import FAST_LANE, STATE_KEY, Handler, ProxyContext, key_accepted
from lmfleet.proxy.fast_lane import FastLane
from lmfleet.proxy.forward import forward
from lmfleet.proxy.metrics import ProxyMetrics
from lmfleet.proxy.nodes_api import BadRequest
from lmfleet.proxy.options import ProxyOptions
from lmfleet.proxy.shared import SharedState
from lmfleet.surface import FleetSurface
from lmfleet.transport import AsyncFleetTransport
from lmfleet.transport.models import MODELS_PATH
from lmfleet.transport.router import Router
from lmfleet.wire.upstream import Http11Transport

log = logging.getLogger("lmfleet.proxy")

ROUTES: dict[str, dict[str, Handler]] = {
    "/health": {"GET": admin_api.health},
    "/liveness": {"GET": admin_api.liveness},
    "/readiness": {"GET": admin_api.readiness},
    "/metrics": {"GET": admin_api.metrics},
    "/v1/models": {"GET": admin_api.models},
    "/nodes/status": {"GET": nodes_api.status},
    "/nodes/add": {"POST": nodes_api.add},
    "/nodes/remove": {"POST": nodes_api.remove},
    "/nodes/terminate": {"POST": nodes_api.terminate},
    "/nodes/terminate_all": {"GET": nodes_api.terminate_all},
    "/fleet/status": {"GET": admin_api.fleet_status},
    "/fleet/explain": {"GET": admin_api.explain},
    "/fleet/sleep": {"POST": admin_api.sleep},
    "/fleet/wakeup": {"POST": admin_api.wakeup},
    "/fleet/drain": {"POST": admin_api.drain},
    "/fleet/abort": {"POST": admin_api.abort},
    "/fleet/update_weights": {"POST": admin_api.update_weights},
    "/distserve/connection_warmup": {"POST": distserve_api.connection_warmup},
    "/distserve/gc": {"POST": distserve_api.gc},
    "/generate": {"POST": forward},
    "/inference/v1/generate": {"POST": forward},  # vLLM's token route
    "/abort_request": {"POST": admin_api.abort_request},
    "/pooling": {"POST": forward},
    "/v1/files": {"GET": batch_api.files_root, "POST": batch_api.files_root},
    "/v1/batches": {"GET": batch_api.batches_root, "POST": batch_api.batches_root},
}
FORWARD: dict[str, Handler] = {"POST": forward}
"""Every other `/v1/*` path: chat, completions, embeddings, encode, responses, ..."""
ONE_MODEL: dict[str, Handler] = {"GET": admin_api.model}
"""`/v1/models/{model}`: answered here, as no LMDeploy node serves it."""
ONE_MODEL_PREFIX = MODELS_PATH + "/"
JOB_OBJECTS: dict[str, dict[str, Handler]] = {
    "/v1/files/": {"GET": batch_api.one_file, "DELETE": batch_api.one_file},
    "/v1/batches/": {"GET": batch_api.one_batch, "POST": batch_api.one_batch},
}
"""The Batch API's routes with an id in the path (proxy/batch_api.py)."""

ALWAYS_PUBLIC = frozenset({"/liveness"})
"""Paths that never need a key, whatever `public_paths` says: a liveness probe that
failed on a key would get a healthy proxy restarted, and the answer reveals nothing."""

ADMIN_PREFIXES = ("/nodes/", "/fleet/")
"""Routes that change or reveal the fleet; with `admin_keys` set only those keys open them."""

KNOWN_FORWARDS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/encode", "/v1/responses"}
)


class ProxyApp:
    """The ASGI callable. `port` is the bound port (to refuse registering the proxy itself)."""

    def __init__(self, fleet: FleetSurface, options: ProxyOptions, port: int) -> None:
        self.fleet = fleet
        self.options = options
        self.port = port
        self._keys = [b"Bearer " + k.encode() for k in options.api_keys]
        self._admin_keys = [b"Bearer " + k.encode() for k in options.admin_keys]
        self._public = frozenset(options.public_paths) | ALWAYS_PUBLIC
        self._runtime: ProxyContext | None = None
        self.shared: SharedState | None = None
        """The facts this worker shares with the others (`--workers`), None alone."""

    def stop(self) -> None:
        """Begin a quiet stop (`ProxyContext.stop`); called in the proxy's loop before uvicorn's
        own shutdown, so no waiting request is left for uvicorn to cancel."""
        if self._runtime is not None:
            self._runtime.stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)

    # -- lifespan -------------------------------------------------------------------

    def _fast_lane(self, rt: ProxyContext) -> FastLane | None:
        """The front door's fast lane, where the fleet routes with a `Router` (not
        DistServe's two phases) and `fast_lane` is on."""
        planner = self.fleet.planner
        if not self.options.fast_lane or not isinstance(planner, Router):
            return None
        return FastLane(
            rt,
            planner,
            rt.upstream,
            keys=self._keys,
            public=self._public,
        )

    def _open(self) -> ProxyContext:
        routing = self.fleet.options.routing
        inner = Http11Transport(max_connections=routing.max_connections)
        wait = self.options.upstream_timeout
        metrics = ProxyMetrics(self.fleet, None if self.shared is None else self.options.worker)
        if self.shared is not None:
            self.shared.render = metrics.render  # what another worker's scrape gets
        return ProxyContext(
            fleet=self.fleet,
            options=self.options,
            port=self.port,
            transport=AsyncFleetTransport(self.fleet.planner, inner),
            upstream=inner,
            metrics=metrics,
            shared=self.shared,
            timeout={"connect": routing.connect_timeout, "read": wait, "write": wait, "pool": wait},
            key_priorities={
                b"Bearer " + key.encode(): str(priority).encode()
                for key, priority in self.options.key_priorities.items()
            },
        )

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime: ProxyContext | None = None
        async with anyio.create_task_group() as group, self._jobs_dir() as jobs_dir:
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    runtime = self._runtime = self._open()
                    runtime.jobs = BatchJobs(
                        jobs_dir,
                        self.fleet,
                        runtime.transport,
                        self.options.batch_concurrency,
                        self.options.upstream_timeout,
                        shared=self.options.hub is not None,  # the workers share jobs_dir
                    )
                    await group.start(runtime.jobs.run)
                    scope["state"][STATE_KEY] = runtime
                    lane = self._fast_lane(runtime)
                    if lane is not None:
                        scope["state"][FAST_LANE] = lane
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    group.cancel_scope.cancel()  # batch jobs: resumed by the next start
                    if runtime is not None:
                        await runtime.exchanges.aclose()
                        await runtime.transport.aclose()
                        if runtime.distserve_transport is not None:
                            await runtime.distserve_transport.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    @contextlib.asynccontextmanager
    async def _jobs_dir(self) -> AsyncIterator[Path]:
        """Where the Batch API keeps its files and jobs: `jobs_dir`, else a temporary
        directory removed at shutdown (batches then do not outlive the proxy)."""
        if self.options.jobs_dir is not None:
            yield Path(self.options.jobs_dir)
            return
        with tempfile.TemporaryDirectory(prefix="lmfleet-jobs-") as temporary:
            yield Path(temporary)

    # -- requests -------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt: ProxyContext = scope["state"][STATE_KEY]
        path: str = scope["path"]
        methods = ROUTES.get(path)
        if methods is None and path.startswith("/v1/"):
            methods = ONE_MODEL if path.startswith(ONE_MODEL_PREFIX) else FORWARD
            for prefix, objects in JOB_OBJECTS.items():
                if path.startswith(prefix):
                    methods = objects
        if methods is None:
            await rt.answer(send, answers.NO_ROUTE, f"No route {path}.")
            return
        if self._admin_keys and path.startswith(ADMIN_PREFIXES):
            if not _has_key(scope, self._admin_keys):
                _refused_registration(scope, "it must send an admin key")
                await rt.answer(send, answers.UNAUTHORIZED, "Unauthorized.")
                return
        elif self._keys and path not in self._public and not _has_key(scope, self._keys):
            _refused_registration(
                scope,
                "LMDeploy nodes register without one: --public-paths with /nodes/add lets them in",
            )
            await rt.answer(send, answers.UNAUTHORIZED, "Unauthorized.")
            return
        handler = methods.get(scope["method"])
        if handler is None:
            allow = [(b"allow", ", ".join(methods).encode())]
            message = f"Method {scope['method']} not allowed on {path}."
            await rt.answer(send, answers.BAD_METHOD, message, headers=allow)
            return
        rt.metrics.request(_route_label(path, methods))
        if handler is forward:
            rt.metrics.forwarding(+1)
            try:
                await self._guarded(handler, scope, receive, send, rt)
            finally:
                rt.metrics.forwarding(-1)
        else:
            await self._guarded(handler, scope, receive, send, rt)

    async def _guarded(
        self, handler: Handler, scope: Scope, receive: Receive, send: Send, rt: ProxyContext
    ) -> None:
        """Map every failure to its row of the answers table (`GUARDED`), the rest to
        a logged 500; never a traceback to the client."""
        try:
            await handler(scope, receive, send, rt)
        except ClientGone:
            return
        except Exception as exc:
            row = next((row for kind, row in GUARDED if isinstance(exc, kind)), None)
            if row is None:  # the catch-all: logged, answered as a generic 500
                log.exception("proxy error on %s %s", scope["method"], scope["path"])
                row = answers.INTERNAL
            with contextlib.suppress(Exception):  # the response may have started already
                await rt.answer(send, row, row.message(exc))


GUARDED: tuple[tuple[type[Exception] | tuple[type[Exception], ...], answers.Answer], ...] = (
    ((BadRequest, ConfigError), answers.BAD_REQUEST),
    (BodyTooLarge, answers.BODY_TOO_LARGE),
    (BodyTimeout, answers.BODY_TIMEOUT),
    (UnknownNodeError, answers.UNKNOWN_NODE),
    (UnknownRequestError, answers.UNKNOWN_REQUEST),
    (UnknownObjectError, answers.UNKNOWN_OBJECT),
    (NodeCommandError, answers.NODE_COMMAND),
)
"""What a route handler may raise, and the row of lmfleet/answers.py each one is."""


def _route_label(path: str, methods: dict[str, Handler]) -> str:
    """The `route` label of a request: its path, unless the path holds a caller's
    words (a model name, an unknown `/v1/*` path), which would grow the label set."""
    if methods is ONE_MODEL:
        return ONE_MODEL_PREFIX + "{model}"
    if methods is FORWARD and path not in KNOWN_FORWARDS:
        return "/v1/*"
    return path


def _refused_registration(scope: Scope, hint: str) -> None:
    """Say in the log why a node could not register: the node's own log is on another
    host, and its registration is made once, at its start."""
    if scope["path"] == "/nodes/add":
        client = scope.get("client") or ("?", 0)
        log.warning("POST /nodes/add from %s refused: no valid key (%s)", client[0], hint)


def _has_key(scope: Scope, keys: list[bytes]) -> bool:
    """Constant-time check of the Bearer key against every accepted one."""
    given = b""
    for key, value in scope["headers"]:
        if key.lower() == b"authorization":
            given = bytes(value)
            break
    return key_accepted(given, keys)


def create_app(
    fleet: FleetSurface, options: ProxyOptions | None = None, *, port: int = 0
) -> ProxyApp:
    """The proxy's ASGI app for `fleet` (serve it with uvicorn: `fleet.serve()` does)."""
    opts = options or ProxyOptions()
    return ProxyApp(fleet, opts, port or opts.port)
