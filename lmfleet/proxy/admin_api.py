"""lmfleet's own routes: `/fleet/*` (sleep, wakeup, drain, status), `/health`,
`/liveness`, `/readiness`, `/v1/models`, `/v1/models/{model}`.

Handlers run in the fleet's own event loop: they await the fleet's async internals
(`fleet.admin`); the sync methods would deadlock the loop.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import lmfleet.answers as answers
from lmfleet.errors import WeightUpdateError, WeightUpdateUnsupportedError
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.proxy.asgi import Receive, Scope, Send, read_json, send_bytes, send_json
from lmfleet.proxy.nodes_api import ADMIN_BODY_LIMIT, BadRequest
from lmfleet.routing.base import RequestInfo
from lmfleet.transport.models import (
    card_for,
    model_list,
    model_named,
    unknown_model_message,
)
from lmfleet.weights.session import IN_FLIGHT

if TYPE_CHECKING:
    from lmfleet.proxy.context import ProxyContext

UPDATE_BODY_LIMIT = 64 * 1024 * 1024
"""A weight push's bodies are CUDA IPC handles, not tensors, but many buckets for
many ranks add up."""


def _query(scope: Scope) -> dict[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


async def health(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    """`/health`: can this proxy answer an inference request now? 200 while at least
    one node is healthy, or asleep and woken by the first request (`_able`), else 503.

    The meaning of an LMDeploy api_server's own `/health` (503 while it cannot serve),
    so that a proxy can stand where a node stood: behind another lmfleet or LMDeploy
    proxy, or a load balancer that probes `/health`. LMDeploy 0.18's proxy has no
    `/health`. An orchestrator that must tell "alive, waiting for nodes" from "dead"
    probes `/liveness`; one that gates traffic on `min_ready` nodes, `/readiness`.
    """
    nodes = rt.fleet.registry.snapshot()
    healthy, woken = _able(nodes, rt)
    payload = {
        "status": "healthy" if healthy or woken else "unhealthy",
        "healthy": healthy,
        "wakes_on_demand": woken,
        "nodes": [{"url": n.url, "state": n.status.value} for n in nodes],
    }
    await send_json(send, 200 if healthy or woken else 503, payload)


def _able(nodes: list[NodeState], rt: ProxyContext) -> tuple[int, int]:
    """How many of `nodes` can take a request: healthy now, and asleep but woken by
    the first request that finds no awake node (where the fleet wakes on demand;
    `FleetAdmin.wakes`: not quarantined, not held by an admin command, and not one
    whose last wake-up failed a moment ago).

    Those count as able: an idle fleet that put itself to sleep (auto-sleep) must not
    look dead to what stands in front of it (a readiness probe would hold back the
    very traffic that wakes it, and it would sleep for ever)."""
    healthy = sum(1 for n in nodes if n.status is NodeStatus.HEALTHY)
    return healthy, rt.fleet.admin.wakes(RequestInfo())


LIVE = b'{"status":"alive"}'


async def liveness(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    """`/liveness`: 200 whenever the process answers at all, whatever its nodes do.

    For an orchestrator's liveness probe, which restarts what fails it: a proxy whose
    nodes are all down, or that waits for its first node to register, is alive, and
    restarting it would only forget the registered nodes. Never needs a key; reads
    nothing, so it stays cheap however often it is probed.
    """
    await send_bytes(send, 200, LIVE)


async def readiness(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    """`/readiness`: 200 once `min_ready` nodes are healthy, or asleep and woken by the
    first request (`_able`), else 503 (`min_ready`: the fleet's, what `wait_ready`
    waits for); the body says why either way.

    For an orchestrator's readiness probe, which holds traffic back until it passes.
    The body uses the names of SGLang's model gateway (`status` "ready" or
    "not_ready", `healthy_workers`, `total_workers`, `reason` when not ready), so
    dashboards and scripts written for it read this one, plus `min_ready` and one
    entry per node in `workers`: its URL, state and the reason for it.
    """
    nodes = rt.fleet.registry.snapshot()
    healthy, woken = _able(nodes, rt)
    wanted = rt.fleet.options.min_ready
    ready = healthy + woken >= wanted
    payload: dict[str, object] = {
        "status": "ready" if ready else "not_ready",
        "healthy_workers": healthy,
        "wakes_on_demand": woken,
        "total_workers": len(nodes),
        "min_ready": wanted,
    }
    if not ready:
        asleep = f" (and {woken} asleep, woken on demand)" if woken else ""
        payload["reason"] = (
            f"{healthy} of {len(nodes)} node(s) healthy{asleep}; {wanted} needed"
            if nodes
            else f"no node registered yet; {wanted} healthy needed"
        )
    payload["workers"] = [
        {
            "url": n.url,
            "state": n.status.value,
            "is_healthy": n.status is NodeStatus.HEALTHY,
            "models": list(n.models),
            "message": n.message,
            "weight_version": n.weight_version,
            "inflight": n.inflight,
            "peers": n.peers,  # the other workers' or replicas' requests, as shared
        }
        for n in nodes
    ]
    if rt.shared is not None:  # `--workers`, `--store`: whether it still hears the others
        shared = rt.shared
        told: dict[str, object] = {"via": shared.via, "worker": shared.worker}
        told["pid"] = os.getpid()  # which process answered (a worker restarted: another)
        told["connected"] = shared.connected
        registry = rt.fleet.registry
        if registry.metrics_share is not None:  # whose `/metrics` this worker reads
            told["reads_metrics"] = [n.url for n in nodes if registry.reads_metrics(n.url)]
        if shared.problem:
            told["problem"] = shared.problem
        payload["shared"] = told
    await send_json(send, 200 if ready else 503, payload)


async def models(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    """Models served by healthy nodes, in OpenAI's (and LMDeploy's) list shape."""
    await send_json(send, 200, model_list(rt.fleet.registry))


async def model(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    """`GET /v1/models/{model}` (openai's `models.retrieve`), which LMDeploy's nodes do
    not serve: the model's card when a node of the fleet serves it, else the 404 a
    request naming it gets (transport/models.py; the fleet's clients answer alike)."""
    name = model_named(scope["path"]) or ""
    card = card_for(rt.fleet.registry, name)
    if card is None:
        message = unknown_model_message(name, rt.fleet.registry)
        await rt.answer(send, answers.UNKNOWN_MODEL, message, param="model")
        return
    await send_json(send, 200, card)


async def metrics(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    from lmfleet.proxy.metrics import CONTENT_TYPE

    headers = [(b"content-type", CONTENT_TYPE.encode())]
    text = rt.metrics.render()
    if rt.shared is not None:  # one view of every worker (proxy/metrics_merge.py)
        from lmfleet.proxy.metrics_merge import merge

        others = await rt.shared.scrape_others()
        text = merge([text.decode(), *others])
    await send_bytes(send, 200, text, headers)


async def fleet_status(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    await send_json(send, 200, rt.fleet.status().model_dump(mode="json"))


async def explain(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    """`/fleet/explain?model=M`: which node the next request would go to, and why.

    Every eligible node with the strategy's score and the reason in words (the same
    as `fleet.explain()`); nothing is sent or leased.
    """
    models = _query(scope).get("model")
    model = models[0] if models else None
    decision = rt.fleet.registry.explain(rt.fleet.router.strategy, RequestInfo(model=model))
    await send_json(send, 200, dataclasses.asdict(decision))


async def sleep(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    query = _query(scope)
    try:
        level = int((query.get("level") or ["1"])[0])
    except ValueError as exc:
        raise BadRequest("level must be 1 or 2") from exc
    nodes = query.get("node") or None
    await rt.fleet.admin.sleep(level, nodes)
    await send_json(send, 200, {"message": "asleep", "level": level, "nodes": _urls(rt, nodes)})


async def wakeup(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    query = _query(scope)
    tags = query.get("tags") or None
    nodes = query.get("node") or None
    await rt.fleet.admin.wakeup(tags, nodes)
    await send_json(send, 200, {"message": "awake", "tags": tags, "nodes": _urls(rt, nodes)})


async def abort(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    """`?node=URL` (repeatable; none: every node) aborts all on those nodes;
    `?request_id=ID` one request (404 when the fleet cannot abort it)."""
    query = _query(scope)
    ids = query.get("request_id") or []
    request_id = ids[0] if ids else None
    aborted = await rt.fleet.admin.abort(query.get("node") or None, request_id)
    await send_json(send, 200, {"message": "aborted", "nodes": aborted})


async def abort_request(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    """LMDeploy's own `/abort_request` through the proxy: `abort_all` on every node,
    or one `session_id` on the node that runs it. Answers as LMDeploy does (200, no
    body); 404 when no node runs the session."""
    try:
        body = await read_json(scope, receive, ADMIN_BODY_LIMIT)
    except ValueError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from exc
    body = body if isinstance(body, dict) else {}
    if body.get("abort_all"):
        await rt.fleet.admin.abort(None)
    else:
        session = body.get("session_id", -1)
        if isinstance(session, bool) or not isinstance(session, int):
            raise BadRequest("session_id must be an integer")
        await rt.fleet.admin.abort_session(session)
    await send_bytes(send, 200, b"", [])


async def drain(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
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


async def update_weights(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    """`/fleet/update_weights`: `fleet.update_weights` over HTTP, behind the admin keys.

    Body: `version` (int), `payload` (one `UpdateParamsRequest` body or serialized
    string, a list of them, or `{node URL: bodies}`), optional `nodes`, `rolling`
    (false or a number of nodes), `level` (1 or 2), `allow_mixed`, `in_flight`
    ("continue", the default, "drain" or "abort"). Answers the
    result (`updated`, `failed` with reasons, `seconds`); 501 when a node cannot load
    weights online (the message names the server flag), 502 when every node failed.
    """
    try:
        body = await read_json(scope, receive, UPDATE_BODY_LIMIT)
    except ValueError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("Give the update as a JSON object with version and payload.")
    version, payload = body.get("version"), body.get("payload")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BadRequest("version must be an integer weight version")
    if payload is None:
        raise BadRequest("payload is required: a body, a list of bodies, or {url: bodies}")
    nodes = body.get("nodes")
    if nodes is not None and not (
        isinstance(nodes, list) and all(isinstance(n, str) for n in nodes)
    ):
        raise BadRequest("nodes must be a list of node URLs")
    rolling = body.get("rolling", False)
    if not isinstance(rolling, (bool, int)):
        raise BadRequest("rolling must be false or a number of nodes")
    level = body.get("level", 1)
    allow_mixed = body.get("allow_mixed")
    if allow_mixed is not None and not isinstance(allow_mixed, bool):
        raise BadRequest("allow_mixed must be true or false")
    in_flight = body.get("in_flight", "continue")
    if in_flight not in IN_FLIGHT:
        raise BadRequest(f"in_flight must be one of {', '.join(IN_FLIGHT)}")
    try:
        result = await rt.fleet.aupdate_weights(
            payload,
            version=version,
            nodes=nodes,
            rolling=rolling,
            level=level,
            allow_mixed=allow_mixed,
            in_flight=in_flight,
        )
    except WeightUpdateUnsupportedError as exc:
        await rt.answer(send, answers.WEIGHT_UPDATE_UNSUPPORTED, str(exc))
        return
    except WeightUpdateError as exc:
        await rt.answer(send, answers.WEIGHT_UPDATE_FAILED, str(exc))
        return
    await send_json(
        send,
        200,
        {
            "version": result.version,
            "updated": list(result.updated),
            "failed": dict(result.failed),
            "seconds": round(result.seconds, 3),
        },
    )


def _urls(rt: ProxyContext, nodes: list[str] | None) -> list[str]:
    return rt.fleet.admin.targets(nodes)
