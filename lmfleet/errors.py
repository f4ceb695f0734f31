"""Every error lmfleet raises, in one tree.

    LMFleetError
     +-- ConfigError (ValueError)           bad option, unknown strategy name
          +-- JournalMismatchError          a batch journal records another batch
     +-- UnknownNodeError (LookupError)     a URL that is not in the fleet
     +-- UnknownRequestError (LookupError)  a request id the fleet cannot abort
     +-- UnknownObjectError (LookupError)   a Batch API file or batch id names nothing
     +-- UnfinishedItemError (LookupError)  a journal has no answer for the item
     +-- RecordedItemError (RuntimeError)   an item's error as a journal recorded it
     +-- NotReadyError (TimeoutError)       wait_ready ran out of time
     +-- LaunchError (RuntimeError)         a launched node exited or failed to start
     +-- NodeCommandError (RuntimeError)    a node refused sleep / wakeup / ...
          +-- EngineCapabilityError         the node's engine (or how it was started)
     |                                      cannot do it: names the engine and what
     +-- EventLoopError (RuntimeError)      the fleet's event loop did not start, or a
     |                                      blocking call was made from inside it
     +-- BatchError (RuntimeError)          BatchResult.raise_for_errors: an item failed
     +-- WeightUpdateError (RuntimeError)   a weight update failed on every node, or a
     |                                      phase was called out of order
          +-- WeightUpdateUnsupportedError  a node cannot load weights online (the
     |                                      message names the missing server flag)
     +-- RoutingError (openai.APIConnectionError)
          +-- FleetClosedError (RuntimeError)  the fleet was closed: its methods, and
          |                                 requests through the clients it gave out
          +-- NoHealthyNodeError            nothing eligible within wait_for_node
          +-- FleetBusyError                the admission queue (requests waiting for a
          |                                 node) is full: try again after `retry_after`
          +-- NodeUnavailableError          every failover attempt failed (5xx, unreachable,
          |                                 dropped, no first byte in time)
          +-- StreamInterruptedError        the node failed after the stream started
          +-- MigrationError                DistServe could not connect a prefill/decode pair

A name in parentheses is the class's second base: code that catches the plain
Python (or openai) error, `except RuntimeError` say, still catches it.

A request for a model no node serves is answered by the router, before any node
is asked, like a node would answer it: an HTTP 404 in OpenAI's error shape whose
message lists the served models (`openai.NotFoundError` for the clients), so the
clients and the proxy report it the same way (transport/router.py).

Routing errors are raised inside the HTTP transport (or while a body is read)
and are `openai.APIConnectionError`s, not httpx2 errors: openai (>= 3) lets its
own errors through as they are, neither wrapping nor retrying them, while it would
wrap an httpx2 error raised mid-stream in a bare "Connection error.". So on the
fleet's clients `except lmfleet.NoHealthyNodeError` (or `StreamInterruptedError`)
works, code written against plain openai still catches
`openai.APIConnectionError`, and the router stays the one retry owner for node
failures (docs/guide/failover.md has the whole table).
"""

from __future__ import annotations

import httpx2
import openai

from lmfleet.plain_errors import (
    SERVE_MODULES,
    BatchError,
    ConfigError,
    EngineCapabilityError,
    EventLoopError,
    JournalMismatchError,
    LaunchError,
    LMFleetError,
    NodeCommandError,
    NotReadyError,
    RecordedItemError,
    UnfinishedItemError,
    UnknownNodeError,
    UnknownObjectError,
    UnknownRequestError,
    WeightUpdateError,
    WeightUpdateUnsupportedError,
    install_hint,
    require_serve,
)

__all__ = [
    "SERVE_MODULES",
    "BatchError",
    "ConfigError",
    "EngineCapabilityError",
    "EventLoopError",
    "FleetBusyError",
    "FleetClosedError",
    "JournalMismatchError",
    "LMFleetError",
    "LaunchError",
    "MigrationError",
    "NoHealthyNodeError",
    "NodeCommandError",
    "NodeUnavailableError",
    "NotReadyError",
    "RecordedItemError",
    "RoutingError",
    "StreamInterruptedError",
    "UnfinishedItemError",
    "UnknownNodeError",
    "UnknownObjectError",
    "UnknownRequestError",
    "WeightUpdateError",
    "WeightUpdateUnsupportedError",
    "install_hint",
    "require_serve",
]


class RoutingError(LMFleetError, openai.APIConnectionError):
    """Raised by the fleet transports while routing a request or reading its answer.

    An openai error, so openai re-raises it unwrapped and does not retry it: the
    router already failed over, or waited `wait_for_node`.
    """

    def __init__(self, message: str, *, request: httpx2.Request | None = None) -> None:
        # openai.APIError's __init__ requires a request; set its fields directly.
        Exception.__init__(self, message)
        self.request = request  # type: ignore[assignment]  # None: raised outside a send
        self.message = message
        self.body = None
        self.code = None
        self.param = None
        self.type = type(self).__name__


class FleetClosedError(RoutingError, RuntimeError):
    """The fleet has been closed. Its methods raise it, and so does every request
    through a client it gave out (`fleet.client()`, `fleet.async_client()`), which
    would otherwise go on routing over nodes nothing watches any more. A
    `RuntimeError` as before, and an `openai.APIConnectionError` like every error a
    request through the fleet's clients raises, so openai lets it through unretried."""


class NoHealthyNodeError(RoutingError):
    """No healthy node serving the model appeared within `wait_for_node` seconds."""


class FleetBusyError(RoutingError):
    """No node was eligible and the admission queue was full (`routing.admission_queue`
    requests already waiting): the fleet refuses at once rather than queue without
    bound. The proxy answers 503 with `Retry-After`."""

    retry_after: float = 1.0


class NodeUnavailableError(RoutingError):
    """Every failover attempt failed before the node answered."""


class StreamInterruptedError(RoutingError):
    """The node failed after response bytes reached the caller: never replayed."""


class MigrationError(RoutingError):
    """DistServe could not connect a (prefill, decode) pair or hand a KV cache over."""
