"""Every outcome a caller can see, in one table: how it reaches an HTTP caller.

A routed request ends in an answer from a node, or in one of the outcomes below.
The fleet's clients raise the typed exception named in each row (`raised`); the
proxy answers the same outcome as `status` with an OpenAI-shaped body of error
`type`, counts it in `lmfleet_proxy_errors_total{kind=row.kind}`, and adds the
`Retry-After` and `x-should-retry` headers the row says. Answers decided before any
node is asked (an unknown model, a bad weight-version ask) are built from their rows
by the router itself, so both doors give them alike.

Retry rules (one retry owner per path): a row whose wait already happened inside the
router (no node within the wait, every attempt failed) says `x-should-retry: false`,
so openai clients of the proxy do not multiply the wait; a row refused without any
wait (a full admission queue, a full connection pool, a proxy shutting down) says
when to come back and leaves retrying to the client.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import httpx2

from lmfleet.errors import (
    ConfigError,
    FleetBusyError,
    FleetClosedError,
    NodeCommandError,
    NodeUnavailableError,
    NoHealthyNodeError,
    RoutingError,
    StreamInterruptedError,
    UnknownNodeError,
    UnknownObjectError,
    UnknownRequestError,
    WeightUpdateError,
    WeightUpdateUnsupportedError,
)


class RetryAfter(Enum):
    """What a row's `Retry-After` header says."""

    NONE = "none"
    """No header."""
    GIVEN = "given"
    """The seconds the error carries (`FleetBusyError.retry_after`)."""
    HEALTH = "health"
    """The fleet's health interval: about when the fleet can have changed its mind."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One row: how an outcome reaches an HTTP caller."""

    kind: str
    """Its name, and the `kind` label of `lmfleet_proxy_errors_total`."""
    status: int
    error_type: str
    """The OpenAI error type in the body."""
    retry_after: RetryAfter = RetryAfter.NONE
    no_retry: bool = False
    """Send `x-should-retry: false`: the router already waited or failed over."""
    raised: type[BaseException] | None = None
    """What a fleet client raises for it (None: the client gets the HTTP answer)."""
    explain: str = "{exc}"
    """The message from the exception (`str.format` with `exc`)."""

    def message(self, exc: BaseException) -> str:
        return self.explain.format(exc=exc)

    def headers(
        self, *, retry_after: float | None = None, health_interval: float = 1.0
    ) -> list[tuple[bytes, bytes]]:
        """The row's headers (`retry_after`: the error's own, for `RetryAfter.GIVEN`)."""
        head: list[tuple[bytes, bytes]] = []
        seconds = {
            RetryAfter.NONE: None,
            RetryAfter.GIVEN: retry_after,
            RetryAfter.HEALTH: health_interval,
        }[self.retry_after]
        if seconds is not None:
            head.append((b"retry-after", str(max(1, math.ceil(seconds))).encode()))
        if self.no_retry:
            head.append((b"x-should-retry", b"false"))
        return head


UNAVAILABLE = "service_unavailable"

# -- a routed request ----------------------------------------------------------------
FLEET_BUSY = Answer("fleet_busy", 503, UNAVAILABLE, RetryAfter.GIVEN, raised=FleetBusyError)
NO_HEALTHY_NODE = Answer(
    "no_healthy_node", 503, UNAVAILABLE, RetryAfter.HEALTH, no_retry=True, raised=NoHealthyNodeError
)
SHUTTING_DOWN = Answer("shutting_down", 503, UNAVAILABLE, RetryAfter.HEALTH)
"""A request still waiting for a node when the proxy stops: a retry after the restart
is welcome (the clients' twin is `FLEET_CLOSED`)."""
FLEET_CLOSED = Answer("fleet_closed", 503, UNAVAILABLE, RetryAfter.HEALTH, raised=FleetClosedError)
NODE_UNAVAILABLE = Answer(
    "node_unavailable", 502, "bad_gateway", no_retry=True, raised=NodeUnavailableError
)
CONNECTION_LIMIT = Answer(
    "connection_limit",
    503,
    UNAVAILABLE,
    RetryAfter.HEALTH,
    raised=httpx2.PoolTimeout,
    explain="The proxy is at its upstream connection limit: {exc}",
)
"""Every one of `max_connections` stayed busy: the proxy is full, not the node slow."""
UPSTREAM_TIMEOUT = Answer(
    "upstream_timeout",
    504,
    "timeout",
    raised=httpx2.TimeoutException,
    explain="The node did not answer in time: {exc!r}",
)
UPSTREAM_ERROR = Answer(
    "upstream_error",
    502,
    "bad_gateway",
    raised=httpx2.TransportError,
    explain="The node failed: {exc!r}",
)
INTERRUPTED = Answer("interrupted", 502, "bad_gateway", raised=StreamInterruptedError)
"""A stream cut after it started: the proxy ends it with an SSE error event."""
INTERRUPTED_TIMEOUT = Answer(
    "interrupted",
    504,
    "timeout",
    raised=StreamInterruptedError,
    explain="The node sent nothing in time: {exc!r}",
)
UNKNOWN_MODEL = Answer("unknown_model", 404, "not_found_error")
"""Decided by the router before any node is asked; clients get `openai.NotFoundError`."""
BAD_VERSION = Answer("bad_version", 400, "invalid_request_error")
"""A weight-version ask that is no integer; clients get `openai.BadRequestError`."""
BAD_PRIORITY = Answer("bad_priority", 400, "invalid_request_error")
"""A request priority that is no integer (lmfleet/priority.py); `openai.BadRequestError`."""
BAD_TIMEOUT = Answer("bad_timeout", 400, "invalid_request_error")
"""An `x-lmfleet-timeout` that is no positive number of seconds; `openai.BadRequestError`."""
UNKNOWN_ASK = Answer("unknown_ask", 400, "invalid_request_error")
"""An `x-lmfleet-*` request header lmfleet does not read: a misspelt ask (a
staleness bound, a version) would otherwise be served as if never made."""

# -- the proxy's own: the request as it arrived, and its admin routes ----------------
BAD_JSON = Answer("bad_json", 400, "invalid_request_error")
BODY_TOO_LARGE = Answer(
    "body_too_large", 413, "invalid_request_error", explain="The request body is too large."
)
BODY_TIMEOUT = Answer(
    "body_timeout",
    408,
    "invalid_request_error",
    explain="The request body did not arrive in time.",
)
UNAUTHORIZED = Answer("unauthorized", 401, "authentication_error")
NO_ROUTE = Answer("no_route", 404, "not_found")
BAD_METHOD = Answer("bad_method", 405, "invalid_request_error")
BAD_REQUEST = Answer("bad_request", 400, "invalid_request_error", raised=ConfigError)
UNKNOWN_NODE = Answer("unknown_node", 404, "not_found", raised=UnknownNodeError)
UNKNOWN_REQUEST = Answer("unknown_request", 404, "not_found", raised=UnknownRequestError)
NODE_COMMAND = Answer("node_command", 502, "bad_gateway", raised=NodeCommandError)
UNKNOWN_OBJECT = Answer("unknown_object", 404, "invalid_request_error", raised=UnknownObjectError)
"""A Batch API file or batch id that names nothing (as OpenAI answers it)."""
WEIGHT_UPDATE_UNSUPPORTED = Answer(
    "weight_update_unsupported",
    501,
    "weight_update_unsupported",
    raised=WeightUpdateUnsupportedError,
)
WEIGHT_UPDATE_FAILED = Answer(
    "weight_update_failed", 502, "weight_update_failed", raised=WeightUpdateError
)
INTERNAL = Answer(
    "internal", 500, "internal_error", explain="Internal proxy error; see the proxy log."
)

ROWS: tuple[Answer, ...] = (
    FLEET_BUSY,
    NO_HEALTHY_NODE,
    SHUTTING_DOWN,
    FLEET_CLOSED,
    NODE_UNAVAILABLE,
    CONNECTION_LIMIT,
    UPSTREAM_TIMEOUT,
    UPSTREAM_ERROR,
    INTERRUPTED,
    INTERRUPTED_TIMEOUT,
    UNKNOWN_MODEL,
    BAD_VERSION,
    BAD_PRIORITY,
    BAD_TIMEOUT,
    UNKNOWN_ASK,
    BAD_JSON,
    BODY_TOO_LARGE,
    BODY_TIMEOUT,
    UNAUTHORIZED,
    NO_ROUTE,
    BAD_METHOD,
    BAD_REQUEST,
    UNKNOWN_NODE,
    UNKNOWN_REQUEST,
    NODE_COMMAND,
    WEIGHT_UPDATE_UNSUPPORTED,
    WEIGHT_UPDATE_FAILED,
    INTERNAL,
)
"""The whole table (docs/proxy.md shows it; tests reach every row)."""

_ROUTED: tuple[Answer, ...] = (
    FLEET_BUSY,
    FLEET_CLOSED,  # before RoutingError's other kinds: it is one too
    NO_HEALTHY_NODE,
    NODE_UNAVAILABLE,
    CONNECTION_LIMIT,  # a PoolTimeout is a TimeoutException too
    UPSTREAM_TIMEOUT,
    UPSTREAM_ERROR,
)


def routed(exc: BaseException, *, stopping: bool = False) -> Answer | None:
    """The row for an exception a routed request raised; None when it is no outcome
    of routing (a bug: the caller's catch-all answers it as `INTERNAL`).

    `stopping`: the proxy is shutting down, so a request given up while it waited
    for a node is `SHUTTING_DOWN`, not `NO_HEALTHY_NODE`."""
    if stopping and isinstance(exc, NoHealthyNodeError):
        return SHUTTING_DOWN
    for row in _ROUTED:
        if row.raised is not None and isinstance(exc, row.raised):
            return row
    if isinstance(exc, RoutingError):
        return UPSTREAM_ERROR
    return None


def cut(exc: BaseException) -> Answer:
    """The row for a stream cut after it started by `exc`."""
    return INTERRUPTED_TIMEOUT if isinstance(exc, httpx2.TimeoutException) else INTERRUPTED


# -- OpenAI-shaped error bodies, as LMDeploy sends them ------------------------------


def error_body(
    message: str, *, code: int, type: str = "invalid_request_error", param: str | None = None
) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": type, "param": param, "code": code}


def error_bytes(
    message: str, *, code: int, type: str = "invalid_request_error", param: str | None = None
) -> bytes:
    return json.dumps(error_body(message, code=code, type=type, param=param)).encode()
