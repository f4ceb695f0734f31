"""`FleetTransport`: an httpx2 transport that sends each request to a fleet node.

It performs only the I/O that `RequestPlan` asks for; see `router.py` for the
rules. The returned response's stream holds the node's lease until it is closed.
"""

from __future__ import annotations

import time

import httpx2

from lmfleet.transport.distserve import DistServePlan, drive_sync
from lmfleet.transport.router import Router
from lmfleet.transport.streams import lease_response


class FleetTransport(httpx2.BaseTransport):
    def __init__(self, router: Router, inner: httpx2.BaseTransport) -> None:
        self._router = router
        self._inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        distserve = self._router.distserve
        plan = self._router.plan(request) if distserve is None else distserve.route(request)
        if isinstance(plan, DistServePlan):
            return drive_sync(plan.steps(), self._inner)
        if plan.immediate is not None:
            return plan.immediate
        while True:
            lease = plan.next_node()
            if lease is None:
                time.sleep(plan.poll_interval)
                continue
            try:
                response = self._inner.handle_request(request)
            except httpx2.TransportError as exc:
                time.sleep(plan.failed(lease, exc))
                continue
            pause = plan.rejected(lease, response)
            if pause is None:
                return lease_response(response, lease)
            response.close()
            time.sleep(pause)

    def close(self) -> None:
        self._inner.close()
