"""`ProxyContext`: what one running proxy app owns, and the handler signature of its routes.

Defined below `app.py` and the route modules so that each route depends on it
rather than on the app that dispatches to it (no circle of imports). Not to be
confused with the fleet's `FleetRuntime` (its event loop), which this one reaches
through `fleet.runtime`.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx2

from lmfleet.answers import Answer
from lmfleet.node.client import UrlCache
from lmfleet.proxy.asgi import Receive, Scope, Send, send_error
from lmfleet.proxy.exchanges import Exchanges
from lmfleet.proxy.metrics import ProxyMetrics
from lmfleet.proxy.options import ProxyOptions
from lmfleet.surface import FleetSurface
from lmfleet.transport import AsyncFleetTransport
from lmfleet.wire.upstream import Http11Transport

STATE_KEY = "lmfleet.proxy"
"""The lifespan state's key for the app's `ProxyContext`."""

FAST_LANE = "lmfleet.fast_lane"
"""The lifespan state's key for the front door's fast lane (lmfleet/proxy/fast_lane.py),
absent when the proxy has none."""


class Cuttable(Protocol):
    """A stream being relayed, as `ProxyContext.stop` cuts it (an anyio cancel scope,
    or the fast lane's relay)."""

    def cancel(self) -> None: ...


@dataclass
class ProxyContext:
    """What one running app owns: created at lifespan startup, closed at shutdown."""

    fleet: FleetSurface
    options: ProxyOptions
    port: int
    transport: AsyncFleetTransport
    upstream: Http11Transport
    """The pool under `transport`, which the fast lane sends on too."""
    metrics: ProxyMetrics
    timeout: dict[str, float | None]
    urls: UrlCache = field(default_factory=UrlCache)
    distserve_transport: httpx2.AsyncBaseTransport | None = None
    """The DistServe admin routes' own upstream pool, off the hot path's; made on first use."""
    stopping: bool = False
    """Set by `stop()`: the proxy is shutting down."""
    streams: set[Cuttable] = field(default_factory=set)
    """The streams being relayed now (their cancel scopes), for `stop()` to cut."""
    exchanges: Exchanges = field(default_factory=Exchanges)
    """The forwarded requests open now, swept for late bodies and callers gone."""
    shared: Any = None
    """The facts shared with the other workers (`proxy/shared.SharedState`), None alone."""
    jobs: Any = None
    """The Batch API's files and jobs (`proxy/batch_api.BatchJobs`), set at startup."""
    key_priorities: dict[bytes, bytes] = field(default_factory=dict)
    """`ProxyOptions.key_priorities` as the forwarder matches them: the caller's
    `Authorization` value -> the priority header's value (built by the app, which
    spells its callers' keys)."""

    async def answer(
        self,
        send: Send,
        row: Answer,
        message: str,
        *,
        retry_after: float | None = None,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer the caller with one row of the answers table (lmfleet/answers.py):
        its status, error type and headers, counted under its kind."""
        self.metrics.error(row.kind)
        head = row.headers(
            retry_after=retry_after, health_interval=self.fleet.options.health.interval
        )
        await send_error(
            send,
            row.status,
            message,
            type=row.error_type,
            param=param,
            headers=[*head, *(headers or [])],
        )

    def give_up(self) -> str | None:
        """Why a request waiting for a node should stop waiting (the plan's `GIVE_UP`)."""
        return STOPPING if self.stopping else None

    def stop(self) -> None:
        """Stop quietly (in the proxy's loop): requests waiting for a node get a 503 with
        Retry-After on their next poll, streams end at once with an error event; answers
        already being made are left to uvicorn's bounded graceful shutdown."""
        self.stopping = True
        for scope in list(self.streams):
            scope.cancel()


STOPPING = "the proxy is shutting down; try again once it is back"


Handler = Callable[[Scope, Receive, Send, ProxyContext], Awaitable[None]]
"""Every route: the ASGI triple plus the app's `ProxyContext`."""


def key_accepted(given: bytes, keys: list[bytes]) -> bool:
    """Whether `given` (an `Authorization` value) is one of `keys`, compared in
    constant time against every one."""
    ok = False
    for accepted in keys:
        ok |= hmac.compare_digest(given, accepted)
    return ok
