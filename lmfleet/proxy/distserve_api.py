"""LMDeploy's proxy routes for DistServe: `POST /distserve/connection_warmup` and
`POST /distserve/gc` (a TODO in LMDeploy 0.18.0; implemented here).

They run the fleet's shared `DistServe` steps (the same ones requests run) over an
upstream transport of their own, one per running app (`ProxyContext.distserve_transport`,
made on first use, closed at shutdown): admin calls are rare, and this keeps them
off the hot path's connection pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import httpx2

from lmfleet.proxy.asgi import Receive, Scope, Send, read_body, send_json
from lmfleet.proxy.nodes_api import ADMIN_BODY_LIMIT, BadRequest
from lmfleet.transport.distserve import DistServe
from lmfleet.transport.steps import drive_async

if TYPE_CHECKING:
    from lmfleet.proxy.context import ProxyContext


def _distserve(rt: ProxyContext) -> DistServe:
    distserve = rt.fleet.distserve
    if distserve is None:
        raise BadRequest(
            "The proxy runs the Hybrid serving strategy; start it with "
            "--serving-strategy DistServe."
        )
    return distserve


def _upstream(rt: ProxyContext) -> httpx2.AsyncBaseTransport:
    """The app's DistServe admin transport (no await between the check and the set)."""
    if rt.distserve_transport is None:
        rt.distserve_transport = httpx2.AsyncHTTPTransport()
    return rt.distserve_transport


async def connection_warmup(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    """Connect every routable (prefill, decode) pair now, concurrently."""
    await read_body(scope, receive, ADMIN_BODY_LIMIT, rt.options.body_timeout)
    distserve = _distserve(rt)
    pairs = distserve.routable_pairs()
    failed: list[list[str]] = []
    inner = _upstream(rt)

    async def one(pair: tuple[str, str]) -> None:
        if not await drive_async(distserve.warmup(pair), inner):
            failed.append(list(pair))

    async with anyio.create_task_group() as tg:
        for pair in pairs:
            tg.start_soon(one, pair)
    await send_json(send, 200, {"SUCCESS": not failed, "pairs": len(pairs), "failed": failed})


async def gc(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    """Free caches shelved on pairs with a dead side, and drop those pairs."""
    await read_body(scope, receive, ADMIN_BODY_LIMIT, rt.options.body_timeout)
    distserve = _distserve(rt)
    result = await drive_async(distserve.gc(), _upstream(rt))
    await send_json(send, 200, result)
