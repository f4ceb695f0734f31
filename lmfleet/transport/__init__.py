"""Client-side routing over httpx2: the path every inference request takes to a node.

Every inference request goes through here: pick a node, lease it, aim the request
at it (`lmfleet.node.client.NodeClient.aim`), delegate to an inner httpx2 transport
(`wire.upstream.Http11Transport` under the proxy), fail over. Requests addressed to
one known node (probes, sleep, wake, weights) bypass routing on purpose: they go
through the node client directly (`lmfleet/node/client.py`).
"""

from lmfleet.transport.async_transport import AsyncFleetTransport
from lmfleet.transport.plan import RequestPlan
from lmfleet.transport.router import Planner, Router
from lmfleet.transport.sync_transport import FleetTransport

__all__ = ["AsyncFleetTransport", "FleetTransport", "Planner", "RequestPlan", "Router"]
