"""`AsyncFleetTransport`: the async twin of `FleetTransport` (same plan, awaited I/O)."""

from __future__ import annotations

import httpx2

from lmfleet.transport.router import Router
from lmfleet.transport.steps import drive_async


class AsyncFleetTransport(httpx2.AsyncBaseTransport):
    def __init__(self, router: Router, inner: httpx2.AsyncBaseTransport) -> None:
        self._router = router
        self._inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self._router.check_open(request)
        return await drive_async(self._router.route(request).steps(), self._inner)

    async def aclose(self) -> None:
        await self._inner.aclose()
