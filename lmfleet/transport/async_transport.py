"""`AsyncFleetTransport`: the async twin of `FleetTransport` (same plan, awaited I/O)."""

from __future__ import annotations

import httpx2

from lmfleet.transport.router import Planner
from lmfleet.transport.steps import drive_async


class AsyncFleetTransport(httpx2.AsyncBaseTransport):
    def __init__(self, planner: Planner, inner: httpx2.AsyncBaseTransport) -> None:
        self._planner = planner
        self._inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        return await drive_async(self._planner.route(request).steps(), self._inner)

    async def aclose(self) -> None:
        await self._inner.aclose()
