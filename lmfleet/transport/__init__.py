"""Client-side routing over httpx2: the path every inference request takes to a node.

Every inference request goes through here: pick a node, lease it, rewrite the URL,
delegate to an inner httpx2 transport (`http11.Http11Transport` under the proxy),
fail over. It is not the only code that talks to nodes: the health monitor sends
`GET /health` through its own HTTP/1.1 client (`lmfleet/probe.py`) and
`/is_sleeping` and `/v1/models` through httpx2 (`lmfleet/health.py`), and node
commands (`/sleep`, `/wakeup`, `/terminate`) go out from `lmfleet/admin.py`. Those
bypass routing on purpose: each is addressed to one known node.
"""

from lmfleet.transport.async_transport import AsyncFleetTransport
from lmfleet.transport.plan import RequestPlan
from lmfleet.transport.router import Planner, Router
from lmfleet.transport.sync_transport import FleetTransport

__all__ = ["AsyncFleetTransport", "FleetTransport", "Planner", "RequestPlan", "Router"]
