"""`create_app(options)`: the emulated api_server as one raw ASGI callable.

Request path: count it, check the API key (LMDeploy's AuthenticationMiddleware:
every path but /health, /docs, /redoc and /nodes*), find the handler with one
dict lookup on (path, method), and run it. Inference routes additionally pass
the sleep gate (LMDeploy's EngineSleepingMiddleware: a fast 503), then the
fault injections, then request validation, then the cost model.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from lmfleet.sim import asgi, dialects, generation, routes, token_routes, weight_routes
from lmfleet.sim.node import NodeRuntime
from lmfleet.sim.options import SimOptions
from lmfleet.sim.protocol import (
    Kind,
    RequestError,
    decode_json,
    dumps,
    error_body,
    parse_generation,
)
from lmfleet.sim.registration import register_with_proxy

log = logging.getLogger("lmfleet.sim")

AUTH_FREE_PREFIXES = ("/health", "/docs", "/redoc", "/nodes")
# Both middlewares answer with LMDeploy's OpenAI-shaped error body.
UNAUTHORIZED = dumps(error_body(401, "Unauthorized."))
SLEEPING = dumps(
    error_body(
        503,
        "Engine is sleeping; call POST /wakeup before inference (e.g. tags=weights&tags=kv_cache).",
    )
)
# EngineSleepingMiddleware is LMDeploy's outermost middleware: while asleep these
# routes answer 503 before the API key is even checked.
SLEEP_GATED = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/generate", "/inference/v1/generate"}
)
NOT_FOUND = b'{"detail":"Not Found"}'
NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
CRASH_STATUS = 3


class SimApp:
    """One emulated node. All state is in `self.runtime`; nothing is global."""

    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.runtime = NodeRuntime(options)
        self._keys = frozenset(k.encode() for k in options.api_keys)
        self._recorded = tuple(name.lower().encode() for name in options.record_headers)
        self._routes: dict[str, dict[str, routes.Handler]] = {
            "/v1/models": {"GET": routes.models},
            "/v1/chat/completions": {"POST": self._inference("chat")},
            "/v1/completions": {"POST": self._inference("completion")},
            "/sim/stats": {"GET": routes.sim_stats},
            "/sim/stats/reset": {"POST": routes.sim_stats_reset},
            "/sim/faults": {"GET": routes.sim_faults_get, "POST": routes.sim_faults_set},
        }
        if options.enable_metrics:
            self._routes["/metrics"] = {"GET": routes.metrics}
        if options.engine != "lmdeploy":
            self._routes.update(dialects.control_routes(self.runtime))
            path = "/generate" if options.engine == "sglang" else "/inference/v1/generate"
            self._routes[path] = {"POST": self._inference("generate")}
            return
        self._routes |= {
            "/health": {"GET": routes.health},
            "/generate": {"POST": self._inference("generate")},
            "/v1/encode": {"POST": routes.encode},
            "/pooling": {"POST": routes.pooling},
            "/v1/embeddings": {"POST": routes.embeddings},
            "/sleep": {"POST": routes.sleep},
            "/wakeup": {"POST": routes.wakeup},
            "/is_sleeping": {"GET": routes.is_sleeping},
            "/abort_request": {"POST": routes.abort_request},
            "/terminate": {"GET": routes.terminate},
        }
        self._routes.update(weight_routes.ROUTES)
        self._routes.update(self.runtime.distserve.routes())

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        path: str = scope["path"]
        stats = self.runtime.stats
        stats.requests_total += 1
        stats.by_path[path] += 1
        for name in self._recorded:
            value = asgi.header(scope, name)
            if value is not None:
                stats.headers[name.decode()][value.decode("latin-1")] += 1
        if path in SLEEP_GATED and scope["method"] == "POST" and self.runtime.is_sleeping:
            if self.options.engine == "lmdeploy":
                await asgi.send_bytes(send, 503, SLEEPING)
                return
            await self.runtime.until_awake()  # vLLM: queued until the wakeup
        if self._keys and not self._authorized(scope) and not path.startswith(AUTH_FREE_PREFIXES):
            await asgi.send_bytes(send, 401, UNAUTHORIZED)
            return
        methods = self._routes.get(path)
        if methods is None:
            await asgi.send_bytes(send, 404, NOT_FOUND)
            return
        handler = methods.get(scope["method"])
        if handler is None:
            await asgi.send_bytes(send, 405, NOT_ALLOWED)
            return
        try:
            await handler(self.runtime, scope, receive, send)
        except routes.Hung:
            return
        except (routes.BadRequest, ValueError) as exc:
            # LMDeploy maps request validation errors to a 400 error body.
            await asgi.send_error(send, 400, str(exc))

    def _authorized(self, scope: asgi.Scope) -> bool:
        value = asgi.header(scope, b"authorization")
        if value is None:
            return False
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and token in self._keys

    def _inference(self, kind: Kind) -> routes.Handler:
        async def handle(
            rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
        ) -> None:
            faults = rt.faults
            rt.inference_requests += 1
            if faults.crash_after is not None and rt.inference_requests > faults.crash_after:
                log.error("crash after %d requests (fault injection)", faults.crash_after)
                os._exit(CRASH_STATUS)
            if faults.hang:
                await routes.hang_forever(receive)
            if faults.hang_after_head:  # a streaming answer whose engine is wedged
                head = [(b"content-type", b"text/event-stream")]
                await send({"type": "http.response.start", "status": 200, "headers": head})
                await routes.hang_forever(receive)
            if faults.should_fail():
                rt.stats.errors_injected += 1
                await asgi.send_error(send, faults.error_status, "Injected fault (lmfleet sim).")
                return
            if not asgi.is_json(scope):
                await asgi.send_error(send, 400, routes.NOT_JSON)
                return
            engine, name, reply = rt.options.engine, None, send
            try:
                try:
                    body: Any = decode_json(await asgi.read_body(receive))
                    if kind == "generate" and engine != "lmdeploy":  # SGLang's or vLLM's
                        given = body
                        body, name = token_routes.lmdeploy_body(engine, given)
                        body["session_id"] = token_routes.session_for(rt, name)
                        reply = token_routes.Reshaper(send, engine, name, given, rt)
                    request = parse_generation(kind, body, rt.model_name, rt.options)
                    extra = await rt.distserve.admit(body, request)
                except RequestError as exc:
                    await asgi.send_error(send, exc.status, exc.message, exc.param)
                    return
                await generation.serve(rt, request, reply, receive, extra)
            finally:
                if name is not None:
                    rt.engine_requests.pop(name, None)

        return handle

    async def _lifespan(self, receive: asgi.Receive, send: asgi.Send) -> None:
        """Start-up runs before uvicorn binds the port: the place for LMDeploy's
        model loading (`--startup-delay`) and its one-shot proxy registration."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.options.startup_delay:
                    await asyncio.sleep(self.options.startup_delay)
                if self.options.proxy_url:
                    await asyncio.to_thread(register_with_proxy, self.options)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(options: SimOptions) -> SimApp:
    """The emulated api_server for `options`, ready for uvicorn or httpx2.ASGITransport."""
    return SimApp(options)
