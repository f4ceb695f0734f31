"""The ASGI contract as this package uses it, and tiny helpers to answer with bytes."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from lmfleet.answers import error_bytes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]


class BodyTooLarge(Exception):
    """The request body is over `max_body_bytes`."""


class BodyTimeout(Exception):
    """The request body did not arrive in time (a slow or stalled client)."""


BODY_TIMEOUT = 30.0
"""Seconds a client may take to send its whole body (slowloris protection)."""


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    head = [*(headers or JSON_HEADERS), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, payload: Any) -> None:
    await send_bytes(send, status, json.dumps(payload).encode())


async def send_error(
    send: Send,
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = error_bytes(message, code=status, type=type, param=param)
    await send_bytes(send, status, body, [*JSON_HEADERS, *(headers or [])])


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


async def read_body(
    scope: Scope, receive: Receive, limit: int, timeout: float | None = BODY_TIMEOUT
) -> bytes:
    """The whole request body; `BodyTooLarge` from Content-Length or while counting,
    `BodyTimeout` when it takes longer than `timeout` seconds to arrive (None: the
    caller bounds the wait, as the forwarding route's exchange does)."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    if timeout is None:
        return await _receive_all(receive, limit)
    try:
        with anyio.fail_after(timeout):
            return await _receive_all(receive, limit)
    except TimeoutError:
        raise BodyTimeout from None


async def _receive_all(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_json(scope: Scope, receive: Receive, limit: int) -> Any:
    """A small JSON body for the admin routes; ValueError when it is not JSON."""
    body = await read_body(scope, receive, limit)
    return json.loads(body) if body.strip() else None
