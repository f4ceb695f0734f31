"""`AsyncFleetTransport`: the async twin of `FleetTransport` (same plan, awaited I/O)."""

from __future__ import annotations

import httpx2

from lmfleet.transport.request import with_request_id
from lmfleet.transport.router import Planner
from lmfleet.transport.steps import drive_async


class AsyncFleetTransport(httpx2.AsyncBaseTransport):
    def __init__(self, planner: Planner, inner: httpx2.AsyncBaseTransport) -> None:
        self._planner = planner
        self._inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        plan = self._planner.route(request)
        return with_request_id(request, await drive_async(plan.steps(), self._inner))

    async def aclose(self) -> None:
        await self._inner.aclose()
