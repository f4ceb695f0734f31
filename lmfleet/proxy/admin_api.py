"""lmfleet's own routes: `/fleet/*` (sleep, wakeup, drain, status), `/health`, `/v1/models`.

Handlers run in the fleet's own event loop: they await the fleet's async internals
(`fleet.admin`); the sync methods would deadlock the loop.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from lmfleet.proxy.asgi import Receive, Scope, Send, read_json, send_bytes, send_json
from lmfleet.proxy.nodes_api import ADMIN_BODY_LIMIT, BadRequest
from lmfleet.state import NodeStatus

if TYPE_CHECKING:
    from lmfleet.proxy.runtime import Runtime


def _query(scope: Scope) -> dict[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


async def health(scope: Scope, receive: Receive, send: Send, rt: Runtime) -> None:
    nodes = rt.fleet.registry.snapshot()
    healthy = sum(1 for n in nodes if n.status is NodeStatus.HEALTHY)
    payload = {
        "status": "healthy" if healthy else "unhealthy",
        "healthy": healthy,
        "nodes": [{"url": n.url, "state": n.status.value} for n in nodes],
    }
    await send_json(send, 200 if healthy else 503, payload)


async def models(scope: Scope, receive: Receive, send: Send, rt: Runtime) -> None:
    """Models served by healthy nodes, in OpenAI's (and LMDeploy's) list shape."""
    names = sorted(
        {
            m
            for n in rt.fleet.registry.snapshot()
            if n.status is NodeStatus.HEALTHY
            for m in n.models
        }
    )
    now = int(time.time())
    cards: list[dict[str, object]] = [
        {
            "id": name,
            "object": "model",
            "created": now,
            "owned_by": "lmdeploy",
            "root": name,
            "parent": None,
            "permission": [],
        }
        for name in names
    ]
    await send_json(send, 200, {"object": "list", "data": cards})


async def metrics(scope: Scope, receive: Receive, send: Send, rt: Runtime) -> None:
    from lmfleet.proxy.metrics import CONTENT_TYPE

    headers = [(b"content-type", CONTENT_TYPE.encode())]
    await send_bytes(send, 200, rt.metrics.render(), headers)


async def fleet_status(scope: Scope, receive: Receive, send: Send, rt: Runtime) -> None:
    await send_json(send, 200, rt.fleet.status().model_dump(mode="json"))


async def sleep(scope: Scope, receive: Receive, send: Send, rt: Runtime) -> None:
    query = _query(scope)
    try:
        level = int((query.get("level") or ["1"])[0])
    except ValueError as exc:
        raise BadRequest("level must be 1 or 2") from exc
    nodes = query.get("node") or None
    await rt.fleet.admin.sleep(level, nodes)
    await send_json(send, 200, {"message": "asleep", "level": level, "nodes": _urls(rt, nodes)})


async def wakeup(scope: Scope, receive: Receive, send: Send, rt: Runtime) -> None:
    query = _query(scope)
    tags = query.get("tags") or None
    nodes = query.get("node") or None
    await rt.fleet.admin.wakeup(tags, nodes)
    await send_json(send, 200, {"message": "awake", "tags": tags, "nodes": _urls(rt, nodes)})


async def drain(scope: Scope, receive: Receive, send: Send, rt: Runtime) -> None:
    try:
        body = await read_json(scope, receive, ADMIN_BODY_LIMIT)
    except ValueError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from exc
    url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str):
        raise BadRequest('Give the node as {"url": "http://host:port"}.')
    timeout = body.get("timeout") if isinstance(body, dict) else None
    if timeout is not None and not isinstance(timeout, (int, float)):
        raise BadRequest("timeout must be a number of seconds")
    drained = await rt.fleet.admin.drain(url, timeout)
    await send_json(send, 200, {"url": rt.fleet.registry.get(url).url, "drained": drained})


def _urls(rt: Runtime, nodes: list[str] | None) -> list[str]:
    return rt.fleet.admin.targets(nodes)
