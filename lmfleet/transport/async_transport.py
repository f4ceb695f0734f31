"""`AsyncFleetTransport`: the async twin of `FleetTransport` (same plan, awaited I/O)."""

from __future__ import annotations

import anyio
import httpx2

from lmfleet.transport.distserve import DistServePlan, drive_async
from lmfleet.transport.router import Router
from lmfleet.transport.streams import lease_response


class AsyncFleetTransport(httpx2.AsyncBaseTransport):
    def __init__(self, router: Router, inner: httpx2.AsyncBaseTransport) -> None:
        self._router = router
        self._inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        distserve = self._router.distserve
        plan = self._router.plan(request) if distserve is None else distserve.route(request)
        if isinstance(plan, DistServePlan):
            return await drive_async(plan.steps(), self._inner)
        if plan.immediate is not None:
            return plan.immediate
        while True:
            lease = plan.next_node()
            if lease is None:
                await anyio.sleep(plan.poll_interval)
                continue
            try:
                response = await self._inner.handle_async_request(request)
            except httpx2.TransportError as exc:
                await anyio.sleep(plan.failed(lease, exc))
                continue
            pause = plan.rejected(lease, response)
            if pause is None:
                return lease_response(response, lease)
            await response.aclose()
            await anyio.sleep(pause)

    async def aclose(self) -> None:
        await self._inner.aclose()
