"""`FleetTransport`: an httpx2 transport that sends each request to a fleet node.

It performs only the I/O that the request's plan asks for (plan.py has the
rules, steps.py the drivers). The returned response's stream holds the node's
lease until it is closed.
"""

from __future__ import annotations

import httpx2

from lmfleet.transport.request import with_request_id
from lmfleet.transport.router import Planner
from lmfleet.transport.steps import drive_sync


class FleetTransport(httpx2.BaseTransport):
    def __init__(self, planner: Planner, inner: httpx2.BaseTransport) -> None:
        self._planner = planner
        self._inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        return with_request_id(
            request, drive_sync(self._planner.route(request).steps(), self._inner)
        )

    def close(self) -> None:
        self._inner.close()
