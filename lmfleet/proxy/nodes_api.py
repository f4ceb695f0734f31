"""LMDeploy proxy compatibility: `/nodes/add|remove|status|terminate|terminate_all`.

Request shapes are LMDeploy's (`{"url": ..., "status": {"models": [...], "role": 1}}`);
success bodies are LMDeploy 0.18's (`{"message": "Added successfully", "url": ...}`).
Failures are OpenAI-shaped errors with a meaningful status (LMDeploy answers 500).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import anyio

import lmfleet.answers as answers
from lmfleet.errors import ConfigError, NodeCommandError, UnknownNodeError
from lmfleet.node.profile import parse_engine
from lmfleet.node.state import NodeRole, parse_speed
from lmfleet.node.views import NodeSnapshot
from lmfleet.proxy import state_file
from lmfleet.proxy.asgi import Receive, Scope, Send, read_json, send_json
from lmfleet.registry import normalize_url
from lmfleet.routing.tiers import parse_priority

if TYPE_CHECKING:
    from lmfleet.proxy.context import ProxyContext

log = logging.getLogger("lmfleet.proxy")
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "0.0.0.0", "::1", "::"})
ADMIN_BODY_LIMIT = 1024 * 1024


class BadRequest(Exception):
    """Invalid input for an admin route: answered with 400 and this message."""


async def _node_url(scope: Scope, receive: Receive, rt: ProxyContext) -> tuple[str, Any]:
    """The `url` of an LMDeploy `Node` body (or the old `?node_url=` query), checked."""
    try:
        body = await read_json(scope, receive, ADMIN_BODY_LIMIT)
    except ValueError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from exc
    url = body.get("url") if isinstance(body, dict) else None
    if url is None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        url = (query.get("node_url") or query.get("url") or [None])[0]
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise BadRequest('Give the node as {"url": "http://host:port"} (http or https).')
    if any(c.isspace() for c in url.strip()):
        raise BadRequest(f"node URL must not contain spaces: {url!r}")
    try:
        return normalize_url(url), body
    except ConfigError as exc:
        raise BadRequest(str(exc)) from exc


def _check_not_self(url: str, rt: ProxyContext) -> None:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = (parts.hostname or "").lower()
    if port == rt.port and (host in LOCAL_HOSTS or host == rt.options.host.lower()):
        raise BadRequest(f"{url} is this proxy itself, not a node.")


def _persist(rt: ProxyContext) -> None:
    if rt.options.state_file is not None:
        state_file.save(rt.options.state_file, rt.fleet)


async def add(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    url, body = await _node_url(scope, receive, rt)
    _check_not_self(url, rt)
    status = body.get("status") if isinstance(body, dict) else None
    status = status if isinstance(status, dict) else {}
    models = status.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise BadRequest("status.models must be a list of model names.")
    try:
        role = NodeRole(int(status.get("role") or 1))
    except (TypeError, ValueError) as exc:
        raise BadRequest("status.role must be 1 (Hybrid), 2 (Prefill) or 3 (Decode).") from exc
    try:
        speed = parse_speed(status.get("speed"), "status.speed")
        given = status.get("priority")
        priority = None if given is None else parse_priority(given, "status.priority")
        given_engine = status.get("engine")
        engine = parse_engine(None if given_engine is None else str(given_engine), "status")
    except ConfigError as exc:
        raise BadRequest(str(exc)) from exc
    # A node that registers itself does so before its port opens: it stays
    # `starting` and is probed until it answers (never dropped). LMDeploy's own
    # registration always sends its `status`; an operator's hand-made add
    # (LMDeploy's docs: `{"url": ...}`) does not, and the log says which it was.
    itself = isinstance(body, dict) and "status" in body
    origin = "registered itself" if itself else "by an operator's POST /nodes/add"
    rt.fleet.add_node(
        url,
        models=models,
        role=role,
        registered=True,
        speed=speed,
        priority=priority,
        origin=origin,
        engine=engine,
    )
    _persist(rt)  # the registry logs the node's arrival or departure
    await send_json(send, 200, {"message": "Added successfully", "url": url})


async def remove(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    url, _ = await _node_url(scope, receive, rt)
    rt.fleet.remove_node(url)
    _persist(rt)  # the registry logs the node's arrival or departure
    await send_json(send, 200, {"message": "Removed successfully", "url": url})


def _lmdeploy_status(node: NodeSnapshot) -> dict[str, Any]:
    """LMDeploy's `Status` fields (models, unfinished, latency, speed, role) plus ours."""
    return {
        "models": node.models,
        "unfinished": node.inflight,
        "latency": [] if node.latency is None else [node.latency],
        "speed": node.speed,
        "role": int(node.role),
        **node.model_dump(mode="json", exclude={"url", "models", "role", "latency", "speed"}),
        "latency_ewma": node.latency,
    }


async def status(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    await send_json(send, 200, {n.url: _lmdeploy_status(n) for n in rt.fleet.nodes})


async def _terminate_one(url: str, rt: ProxyContext) -> str | None:
    """Remove `url`, then ask it to exit (LMDeploy: `GET /terminate`); an error or None."""
    state = rt.fleet.registry.get(url)
    rt.fleet.remove_node(url)
    try:
        await rt.fleet.admin.terminate(state, rt.options.terminate_timeout)
    except NodeCommandError as exc:
        return str(exc)
    return None


async def terminate(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    url, _ = await _node_url(scope, receive, rt)
    failure = await _terminate_one(url, rt)
    _persist(rt)
    if failure is not None:
        log.warning("terminate failed: %s", failure)
        await rt.answer(send, answers.NODE_COMMAND, f"Failed to terminate node {failure}")
        return
    await send_json(send, 200, {"message": "Terminated successfully", "url": url})


async def terminate_all(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    failures: list[str] = []

    async def one(url: str) -> None:
        try:
            failure = await _terminate_one(url, rt)
        except UnknownNodeError:
            return
        if failure is not None:
            failures.append(failure)

    async with anyio.create_task_group() as tg:
        for node in rt.fleet.registry.snapshot():
            tg.start_soon(one, node.url)
    _persist(rt)
    if failures:
        log.warning("terminate_all failed on: %s", "; ".join(failures))
        message = f"Failed to terminate {len(failures)} node(s): {'; '.join(failures)}"
        await rt.answer(send, answers.NODE_COMMAND, message)
        return
    await send_json(send, 200, {"message": "All nodes terminated successfully"})
