"""The router core: how a request becomes a plan, and how a plan aims at a node.

Shared by the sync transport, the async transport and the proxy. `Router.route`
turns a request into a plan (plan.py, or DistServe's when the fleet runs P->D);
the transports only drive the plan's steps (steps.py), so sync and async cannot
drift apart. The failover rules live in plan.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import httpx2

from lmfleet.answers import (
    BAD_PRIORITY,
    BAD_TIMEOUT,
    BAD_VERSION,
    NO_ROUTE,
    UNKNOWN_ASK,
    UNKNOWN_MODEL,
    Answer,
)
from lmfleet.config import RoutingOptions
from lmfleet.errors import FleetClosedError
from lmfleet.node.client import NodeClient
from lmfleet.node.state import NodeRole
from lmfleet.priority import PRIORITY, PRIORITY_FIELD, PRIORITY_HEADER, parse_priority
from lmfleet.registry import NodeRegistry
from lmfleet.routing.affinity import AFFINITY_HEADERS
from lmfleet.routing.base import RequestInfo, Strategy, as_base_strategy
from lmfleet.transport import models as fleet_models
from lmfleet.transport import tracing
from lmfleet.transport.continuation import ContinuedGeneration, wants_continuation
from lmfleet.transport.plan import (
    SERVED_VERSION_HEADER,
    TIMEOUT_HEADER,
    Backoff,
    RequestPlan,
    Routing,
    StarvedHook,
    error_answer,
    parse_timeout,
)
from lmfleet.transport.renaming import model_fields
from lmfleet.transport.request import (
    PARSED_BODY,
    REQUEST_ID,
    REQUEST_ID_HEADER,
    body_bytes,
    json_body,
    new_request_id,
)
from lmfleet.transport.scoring import ScoringPlan, may_score, wants_scoring
from lmfleet.transport.steps import Steps
from lmfleet.transport.token_dialects import TOKEN_PATHS, dialect_of

WEIGHT_VERSION_HEADER = SERVED_VERSION_HEADER
"""On a request: serve it only on nodes of exactly this weight version (on an answer
the same header says which version served it)."""
MIN_WEIGHT_VERSION_HEADER = "x-lmfleet-min-weight-version"
"""On a request: serve it only on nodes of at least this weight version."""
MAX_STALENESS_HEADER = "x-lmfleet-max-staleness"
"""On a request: serve it only on nodes within this many weight versions of the
newest one in the fleet (0: the newest only)."""
_VERSION_FIELDS = (
    ("weight_version", WEIGHT_VERSION_HEADER),
    ("min_weight_version", MIN_WEIGHT_VERSION_HEADER),
    ("max_staleness", MAX_STALENESS_HEADER),
)
"""The same asks as body fields (openai's `extra_body`), with the header each mirrors;
LMDeploy ignores fields it does not know."""
_ASKS = tuple((field, header, header.encode()) for field, header in _VERSION_FIELDS)
"""Each ask's field, header and header as sent (bytes), spelt out once."""
ASK_PREFIX = b"x-lmfleet-"
PLAIN_ASKS = frozenset({REQUEST_ID_HEADER.encode(), TIMEOUT_HEADER.encode()})
"""The `x-lmfleet-*` request headers a plain request may have (`Router.plain_info`):
its id and its timeout; any other one asks routing for something."""
PLAIN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
"""The routes `Router.plain_info` may find plain."""
_PLAIN_FIELDS = frozenset({field for field, _ in _VERSION_FIELDS} | {PRIORITY_FIELD})
"""Body fields that ask routing for something (a weight version, a priority)."""
_PROXY_ONLY = ("/v1/files", "/v1/batches")
"""Routes only the proxy serves: files and batches live in one place, so a fleet's
client must not spread them over nodes (an SGLang node has its own, unknown to the
next node; LMDeploy's and vLLM's have none)."""
_PROXY_ONLY_MESSAGE = (
    "The Batch API (/v1/files, /v1/batches) is served by the lmfleet proxy "
    "(fleet.serve(), lmfleet serve), not by a fleet's client: point an openai client "
    "at the proxy's /v1, or run the requests with fleet.chat_many(..., journal=PATH)."
)
_REQUEST_ID = REQUEST_ID_HEADER.encode()
_PRIORITY = PRIORITY_HEADER.encode()
_TIMEOUT = TIMEOUT_HEADER.encode()
KNOWN_ASKS = frozenset(
    {
        _REQUEST_ID,
        _PRIORITY,
        _TIMEOUT,
        *(header for _, _, header in _ASKS),
        *(name.encode() for name in AFFINITY_HEADERS if name.encode().startswith(ASK_PREFIX)),
    }
)
"""Every `x-lmfleet-*` request header lmfleet reads; any other is refused
(`UNKNOWN_ASK`): a typo in an ask must not go unnoticed."""


def _unknown_asks(names: Iterable[bytes]) -> str:
    known = ", ".join(sorted(name.decode() for name in KNOWN_ASKS))
    given = ", ".join(sorted(name.decode("latin-1") for name in names))
    return f"unknown lmfleet header(s) {given}; lmfleet reads {known}"


class Plan(Protocol):
    """What the transports drive: one request's steps, ending in its answer."""

    def steps(self) -> Steps[httpx2.Response]: ...


class Planner(Protocol):
    """The fleet's serving mode, chosen when the fleet is built and handed to the
    transports: a `Router` (Hybrid: any node serves a whole request) or a `DistServe`
    (prefill on one node, decode on another: transport/distserve)."""

    def route(self, request: httpx2.Request) -> Plan:
        """Start routing `request` (`FleetClosedError` once the fleet is closed)."""
        ...


class Router:
    """Routing for one fleet: a registry, a strategy, and the failover options."""

    def __init__(
        self,
        registry: NodeRegistry,
        strategy: Strategy,
        options: RoutingOptions,
        *,
        on_starved: StarvedHook | None = None,
        affinity_key: Callable[..., str | None] | None = None,
        closed: Callable[[], bool] | None = None,
        nodes: NodeClient | None = None,
    ) -> None:
        """`closed`: whether the fleet is closed; from then on every request through
        the transports raises `FleetClosedError` (`check_open`). `nodes`: the fleet's
        node client, which aims each routed request at its node."""
        self._closed = closed
        self._follow = options.follow_generations
        self._affinity_key = affinity_key if as_base_strategy(strategy).uses_affinity_key else None
        self.routing = Routing(
            registry,
            strategy,
            options,
            nodes or NodeClient(),
            Backoff.of(options),
            on_starved,
            tracing.tracer(),
        )
        """What each plan routes with (failover pauses: exponential from `backoff`,
        capped, with jitter)."""

    @property
    def registry(self) -> NodeRegistry:
        return self.routing.registry

    @property
    def strategy(self) -> Strategy:
        return self.routing.strategy

    @property
    def options(self) -> RoutingOptions:
        return self.routing.options

    @property
    def nodes(self) -> NodeClient:
        return self.routing.nodes

    def route(self, request: httpx2.Request) -> RequestPlan:
        """The Hybrid serving mode (`Planner`): every request is one plan for one node."""
        return self.plan(request)

    def plan(self, request: httpx2.Request, *, role: NodeRole | None = None) -> RequestPlan:
        """Start routing `request`; read its body only when routing needs it.

        The body is parsed at most once per request (`transport.request.json_body`),
        whoever reads it first. `role` limits the nodes to one role.
        Every planner starts here, so a closed fleet's clients stop here (`check_open`).
        """
        self.check_open(request)
        plan: RequestPlan
        models = self.routing.registry.accepted()  # the served models and the aliases
        if request.method == "GET" and (answer := self._models_answer(request)):
            plan = RequestPlan(self.routing, request, RequestInfo(role=role))
            plan.immediate = answer
            return plan
        if request.url.path.startswith(_PROXY_ONLY):
            return self._refused(request, role, NO_ROUTE, _PROXY_ONLY_MESSAGE)
        body = None
        content = body_bytes(request)  # unparsed: substring tests settle most requests
        if (
            PARSED_BODY in request.extensions
            or len(models) > 1
            or self._affinity_key is not None
            or (models and not _names_model(content, models[0]))
            or _may_ask_version(content)
            or may_score(request, content)
            or request.url.path in TOKEN_PATHS
        ):
            body = json_body(request)
        model = body.get("model") if body is not None else None
        model = model if isinstance(model, str) else None
        key = None
        if self._affinity_key is not None:
            key = self._affinity_key(request.headers, body)
        asked = {k.lower(): v for k, v in request.headers.raw if k[:10].lower() == ASK_PREFIX}
        if unknown := asked.keys() - KNOWN_ASKS:
            return self._refused(request, role, UNKNOWN_ASK, _unknown_asks(unknown))
        given = asked.get(_REQUEST_ID)
        request.extensions[REQUEST_ID] = given.decode("latin-1") if given else new_request_id()
        try:
            exact, floor, stale = _version_asks(asked, body)
        except ValueError as exc:
            return self._refused(request, role, BAD_VERSION, str(exc))
        if (timeout := asked.get(_TIMEOUT)) is not None:
            try:
                parse_timeout(timeout)
            except ValueError as exc:
                return self._refused(request, role, BAD_TIMEOUT, str(exc))
        priority = 0
        if (raw := asked.get(_PRIORITY)) is not None or (
            body is not None and (raw := body.get(PRIORITY_FIELD)) is not None
        ):
            where = PRIORITY_HEADER if _PRIORITY in asked else PRIORITY_FIELD
            try:
                priority = parse_priority(raw, where)
            except ValueError as exc:
                return self._refused(request, role, BAD_PRIORITY, str(exc))
            request.extensions[PRIORITY] = priority  # the upstream pool's order
        dialect = None
        if request.url.path in TOKEN_PATHS and request.method == "POST":
            # A token route speaks one engine's dialect: only its nodes can take it.
            dialect = dialect_of(request.url.path, body, self.registry.engines)
        # With one model served (and no alias) every node qualifies: no need to filter.
        info = RequestInfo(
            model=model if len(models) > 1 else None,
            affinity_key=key,
            role=role,
            weight_version=exact,
            min_weight_version=floor,
            max_staleness=stale,
            priority=priority,
            engine=dialect.engine if dialect is not None else None,
        )
        if body is not None and wants_scoring(request, body):
            plan = ScoringPlan(self.routing, request, info, body)
        elif dialect and self._follow and wants_continuation(request, body, dialect):
            assert body is not None
            plan = ContinuedGeneration(self.routing, request, info, body, dialect)
        else:
            plan = RequestPlan(self.routing, request, info)
        if model is not None and models and model not in models:
            plan.immediate = _unknown_model(request, model, self.registry)
        return plan

    def _refused(
        self, request: httpx2.Request, role: NodeRole | None, row: Answer, message: str
    ) -> RequestPlan:
        """A plan that answers at once with `row`, sending nothing to a node: an ask the
        router cannot read, a route no node should get."""
        plan = RequestPlan(self.routing, request, RequestInfo(role=role))
        plan.immediate = error_answer(request, row, message)
        return plan

    def plain_info(self, path: str, body: dict[str, Any]) -> RequestInfo | None:
        """What routing knows of a request that needs nothing but a node, or None when
        `plan` would do more (the proxy's fast lane takes only the first kind:
        lmfleet/proxy/fast_lane.py). `body` is its parsed JSON object; the caller has
        checked that its headers ask for nothing (`PLAIN_ASKS`).

        Plain: a chat or completions request naming a model served under that very
        name (no alias to rename, no unified group), without weight-version asks or a
        priority in its body, not a prompt to score; a fleet that is open and routes
        without an affinity key. Everything else goes by `plan`.
        """
        if path not in PLAIN_PATHS or self._affinity_key is not None:
            return None
        if self._closed is not None and self._closed():
            return None
        model = body.get("model")
        models = self.routing.registry.accepted()
        if not isinstance(model, str) or model not in models:
            return None  # the fleet's 404, or a body `plan` must look at
        if model in self.routing.registry.names.groups or body.get("echo") is not None:
            return None  # renamed on its way (an alias), or maybe scored
        if not _PLAIN_FIELDS.isdisjoint(body):
            return None
        return RequestInfo(model=model if len(models) > 1 else None)

    def _models_answer(self, request: httpx2.Request) -> httpx2.Response | None:
        """The fleet's own answer to `GET /v1/models` (a node's list names only its own
        models) and `GET /v1/models/{name}` (no node has this route), or None."""
        path = request.url.path
        if path == fleet_models.MODELS_PATH:
            listed = fleet_models.model_list(self.registry)
            return httpx2.Response(200, json=listed, request=request)
        name = fleet_models.model_named(path)
        if name is None:
            return None
        card = fleet_models.card_for(self.registry, name)
        if card is None:
            return _unknown_model(request, name, self.registry)
        return httpx2.Response(200, json=card, request=request)

    def check_open(self, request: httpx2.Request) -> None:
        """Raise `FleetClosedError` once the fleet is closed (`plan` asks first): its
        monitor no longer watches the nodes, which may be gone, so a client it gave
        out must not go on routing as if nothing happened."""
        if self._closed is not None and self._closed():
            raise FleetClosedError(
                "this fleet is closed: the clients it gave out send no more requests; "
                "start a new LMFleet and take a client from it",
                request=request,
            )


def _names_model(content: bytes, model: str) -> bool:
    """Whether the body has a `"model"` field naming `model`, the one served, unparsed.

    With one model served routing needs nothing from the body, and parsing it costs
    more than the rest of routing; but a request for another model must still get
    the fleet's 404 listing the served models (the node's own 404 lists none). A
    substring search settles the common case; a body it cannot settle is parsed.
    No body, or one not in memory (a stream), has nothing to check here.
    """
    return not content or any(field in content for field in model_fields(model))


def _may_ask_version(content: bytes) -> bool:
    """Whether an unparsed body may name a weight version, a staleness or a priority (a
    substring test, as in `_names_model`: parsing every body to look would cost more
    than routing)."""
    return (
        b'weight_version"' in content
        or b'max_staleness"' in content
        or b'lmfleet_priority"' in content
    )


def _version_asks(
    asked: dict[bytes, bytes], body: dict[str, Any] | None
) -> tuple[int | None, int | None, int | None]:
    """(exact version, minimum version, max staleness) the request asks for, in a
    header (`asked`: the request's `x-lmfleet-*` headers, read in one pass) or the
    body field it mirrors; ValueError for one that is not a version (a staleness must
    not be negative)."""
    if not asked and not body:
        return None, None, None
    found: list[int | None] = []
    for field, header, raw_header in _ASKS:
        raw: object = asked.get(raw_header)
        where = header
        if raw is None and body is not None and field in body:
            raw, where = body[field], field
        found.append(None if raw is None else _version(raw, where, field == "max_staleness"))
    exact, floor, stale = found
    return exact, floor, stale


def _version(raw: object, where: str, staleness: bool) -> int:
    """`raw` as a whole number of versions; ValueError naming `where` otherwise."""
    what = "a number of versions, 0 or more" if staleness else "an integer weight version"
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ValueError(f"{where} must be {what}, got {raw!r}")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{where} must be {what}, got {raw!r}") from None
    if staleness and value < 0:
        raise ValueError(f"{where} must be {what}, got {raw!r}")
    return value


def _unknown_model(request: httpx2.Request, model: str, registry: NodeRegistry) -> httpx2.Response:
    """LMDeploy's 404 for a model no node serves, plus what the fleet does serve."""
    message = fleet_models.unknown_model_message(model, registry)
    return error_answer(request, UNKNOWN_MODEL, message, param="model")
