"""The router core: pick a node, lease it, rewrite the request, decide on failover.

Shared by the sync transport, the async transport and the proxy. It holds the
whole per-request state machine (`RequestPlan`); the transports only perform the
I/O it asks for (send, sleep), so sync and async cannot drift apart.

Failover rule (DESIGN.md): a request is tried on another node only while no
response byte has reached the caller — a connect error, a connection the node
dropped before answering, or a 502/503 (a sleeping LMDeploy answers 503). Once a
response is handed back, it is never replayed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx2

from lmfleet.config import RoutingOptions
from lmfleet.errors import NodeUnavailableError, NoHealthyNodeError
from lmfleet.registry import NodeRegistry
from lmfleet.routing.base import RequestInfo, Strategy, wants_affinity_key
from lmfleet.state import NodeRole, NodeState
from lmfleet.transport.streams import Accounting
from lmfleet.wire import error_bytes

if TYPE_CHECKING:
    from lmfleet.transport.distserve import DistServe

FAILOVER_STATUS = frozenset({502, 503})
"""Answers that mean "this node cannot take it now": safe to send elsewhere."""

UNREACHED_ERRORS: tuple[type[Exception], ...] = (httpx2.ConnectError, httpx2.ConnectTimeout)
"""The node was never reached: it is down, so the circuit opens at once."""

DROPPED_ERRORS: tuple[type[Exception], ...] = (
    httpx2.RemoteProtocolError,
    httpx2.ReadError,
    httpx2.WriteError,
)
"""The node took the connection but dropped it before any response byte."""

POLL_INTERVAL = 0.05
"""How often a starved request looks for an eligible node again (seconds)."""

StarvedHook = Callable[[str | None], None]

URL_CACHE_SIZE = 4096
"""Node URLs per (node, path) kept parsed; cleared whole when full (query strings vary)."""

PARSED_BODY = "lmfleet.parsed_body"
"""Request extension holding a body its sender already parsed (the proxy), so the
router does not parse it twice."""


def _read_json(request: httpx2.Request) -> dict[str, Any] | None:
    try:
        body = json.loads(request.content)
    except (ValueError, httpx2.RequestNotRead):
        return None
    return body if isinstance(body, dict) else None


class Router:
    """Routing for one fleet: a registry, a strategy, and the failover policy."""

    def __init__(
        self,
        registry: NodeRegistry,
        strategy: Strategy,
        options: RoutingOptions,
        *,
        on_starved: StarvedHook | None = None,
        affinity_key: Callable[..., str | None] | None = None,
    ) -> None:
        self.registry = registry
        self.strategy = strategy
        self.options = options
        self._on_starved = on_starved
        self._affinity_key = affinity_key if wants_affinity_key(strategy) else None
        self._urls: dict[tuple[str, bytes], httpx2.URL] = {}
        self.distserve: DistServe | None = None
        """Set by the fleet in DistServe mode; the transports then ask it first."""

    def plan(
        self, request: httpx2.Request, body: Any = None, *, role: NodeRole | None = None
    ) -> RequestPlan:
        """Start routing `request`; read its body only when routing needs it.

        `body` (or the request's `PARSED_BODY` extension) is the already parsed
        JSON body, when the caller has it. `role` limits the nodes to one role.
        """
        models = self.registry.models()
        if body is None:
            body = request.extensions.get(PARSED_BODY)
        if not isinstance(body, dict):
            body = None
            if len(models) > 1 or self._affinity_key is not None:
                body = _read_json(request)
        model = body.get("model") if body is not None else None
        model = model if isinstance(model, str) else None
        key = None
        if self._affinity_key is not None:
            key = self._affinity_key(request.headers, body)
        # With one model served every node qualifies: the strategy need not filter.
        info = RequestInfo(model=model if len(models) > 1 else None, affinity_key=key, role=role)
        plan = RequestPlan(self, request, info)
        if model is not None and models and model not in models:
            plan.immediate = _unknown_model(request, model, models)
        return plan

    def starved(self, model: str | None) -> None:
        if self._on_starved is not None:
            self._on_starved(model)

    def target(self, request: httpx2.Request, node: NodeState) -> None:
        """Point `request` at `node` and give it the node's own key.

        Building a URL means parsing one, the costliest step of routing; requests go
        to a handful of paths on a handful of nodes, so the results are cached.
        """
        path = request.url.raw_path
        url = self._urls.get((node.url, path))
        if url is None:
            if len(self._urls) >= URL_CACHE_SIZE:
                self._urls.clear()
            url = self._urls[(node.url, path)] = httpx2.URL(node.url + path.decode("ascii"))
        request.url = url
        request.headers["Host"] = url.netloc.decode("ascii")
        if node.api_key:
            request.headers["Authorization"] = f"Bearer {node.api_key}"


def _unknown_model(request: httpx2.Request, model: str, served: list[str]) -> httpx2.Response:
    message = f"The model {model!r} does not exist. Served models: {', '.join(served)}"
    return httpx2.Response(
        404,
        headers={"content-type": "application/json"},
        content=error_bytes(message, code=404, param="model"),
        request=request,
    )


class RequestPlan:
    """One request's way through the fleet: attempts, waits, and the final answer."""

    poll_interval = POLL_INTERVAL

    def __init__(self, router: Router, request: httpx2.Request, info: RequestInfo) -> None:
        self._router = router
        self.request = request
        self.info = info
        self.immediate: httpx2.Response | None = None
        self._tried: list[str] = []
        self._deadline: float | None = None

    def next_node(self) -> Accounting | None:
        """Lease a node and aim the request at it; None means wait `poll_interval`.

        Raises `NoHealthyNodeError` once `wait_for_node` seconds pass without one.
        """
        router = self._router
        node = router.registry.lease(router.strategy, self.info, self._tried)
        if node is not None:
            self._tried.append(node.url)
            router.target(self.request, node)
            return Accounting(router.registry, node.url)
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + router.options.wait_for_node
            router.starved(self.info.model)
        if now >= self._deadline:
            wanted = f" serving {self.info.model!r}" if self.info.model else ""
            raise NoHealthyNodeError(
                f"no healthy node{wanted} within {router.options.wait_for_node:g} s; "
                f"nodes: {self._describe_nodes()}",
                request=self.request,
            )
        return None

    def failed(self, lease: Accounting, exc: httpx2.TransportError) -> float:
        """Account a send that raised; return the pause before the next attempt, or raise."""
        lease.finish(ok=False)
        if isinstance(exc, UNREACHED_ERRORS):
            self._router.registry.mark_failed(lease.url, f"unreachable: {exc!r}")
        elif not isinstance(exc, DROPPED_ERRORS):
            raise exc  # timeouts and our own errors are the caller's to handle
        if len(self._tried) >= self._router.options.max_attempts:
            raise NodeUnavailableError(
                f"{len(self._tried)} attempt(s) failed; last on {lease.url}: {exc!r}",
                request=self.request,
            ) from exc
        return self._backoff()

    def rejected(self, lease: Accounting, response: httpx2.Response) -> float | None:
        """A pause before trying elsewhere when the node turned the request away, else None."""
        if response.status_code not in FAILOVER_STATUS:
            return None
        if len(self._tried) >= self._router.options.max_attempts:
            return None  # out of attempts: hand the 503 to the caller (openai retries it)
        lease.finish(ok=False)
        self._router.registry.mark_failed(lease.url, f"answered HTTP {response.status_code}")
        return self._backoff()

    def _backoff(self) -> float:
        options = self._router.options
        return float(min(options.max_backoff, options.backoff * 2 ** (len(self._tried) - 1)))

    def _describe_nodes(self) -> str:
        nodes = self._router.registry.snapshot()
        if not nodes:
            return "none"
        return ", ".join(f"{n.url} {n.status.value}" for n in nodes)
