"""Every error lmfleet raises, in one tree.

    LMFleetError
     +-- ConfigError (ValueError)          bad option, unknown strategy name
         +-- UnknownNodeError (LookupError)     a URL that is not in the fleet
     +-- FleetClosedError (RuntimeError)    the fleet was closed
     +-- NotReadyError (TimeoutError)       wait_ready ran out of time
     +-- LaunchError (RuntimeError)         a launched node exited or failed to start
     +-- NodeCommandError (RuntimeError)    a node refused sleep / wakeup / ...
     +-- RoutingError (httpx2.TransportError)
          +-- NoHealthyNodeError            nothing eligible within wait_for_node
          +-- NodeUnavailableError          every failover attempt failed to connect
          +-- StreamInterruptedError        the node failed after the stream started
          +-- MigrationError                DistServe could not connect a prefill/decode pair

A request for a model no node serves is answered like a node would answer it, an
HTTP 404 in OpenAI's error shape listing the served models (`openai.NotFoundError`
for the clients), so the clients and the proxy report it the same way.

Routing errors are raised inside the HTTP transport, so they subclass httpx2's
`TransportError`: openai wraps them in `APIConnectionError` (the original is its
`__cause__`) and its own `max_retries` re-enters the router, which is the single
retry owner on the client side.
"""

from __future__ import annotations

import httpx2


class LMFleetError(Exception):
    """Base of every error raised by lmfleet."""


class ConfigError(LMFleetError, ValueError):
    """An option or argument is invalid."""


class UnknownNodeError(LMFleetError, LookupError):
    """The URL names no node of this fleet."""


class FleetClosedError(LMFleetError, RuntimeError):
    """The fleet has been closed."""


class NotReadyError(LMFleetError, TimeoutError):
    """Fewer nodes than required became healthy in time."""


class LaunchError(LMFleetError, RuntimeError):
    """A launched node failed to start or exited; the message carries its log tail."""


class NodeCommandError(LMFleetError, RuntimeError):
    """A node answered an admin command (sleep, wakeup, ...) with an error."""


class RoutingError(LMFleetError, httpx2.TransportError):
    """Raised by the fleet transports while routing a request."""


class NoHealthyNodeError(RoutingError):
    """No healthy node serving the model appeared within `wait_for_node` seconds."""


class NodeUnavailableError(RoutingError):
    """Every failover attempt failed before the node answered."""


class StreamInterruptedError(RoutingError):
    """The node failed after response bytes reached the caller: never replayed."""


class MigrationError(RoutingError):
    """DistServe could not connect a (prefill, decode) pair or hand a KV cache over."""
