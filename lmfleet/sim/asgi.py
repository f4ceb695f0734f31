"""The few raw ASGI helpers the simulator needs (no framework on the hot path).

A benchmark backend must not be the bottleneck, so responses are written as
pre-built header lists plus one body message; see docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from lmfleet.sim.protocol import dumps, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_TYPE = b"application/json"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
DONE = b"data: [DONE]\n\n"


class StreamDropped(Exception):
    """Raised inside a stream to make the server cut the connection (fault injection)."""


async def read_body(receive: Receive) -> bytes:
    """The whole request body (requests here are small)."""
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    chunks = [body]
    while message.get("more_body"):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


async def send_bytes(
    send: Send, status: int, body: bytes, content_type: bytes | None = JSON_TYPE
) -> None:
    """A complete response with a Content-Length (so the server never chunks it)."""
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, obj: Any) -> None:
    await send_bytes(send, status, dumps(obj))


async def send_error(send: Send, status: int, message: str, param: str | None = None) -> None:
    """An OpenAI-shaped error as LMDeploy's create_error_response renders it."""
    await send_bytes(send, status, dumps(error_body(status, message, param)))


async def start_stream(send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})


async def send_event(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def end_stream(send: Send) -> None:
    await send({"type": "http.response.body", "body": DONE})


def header(scope: Scope, name: bytes) -> bytes | None:
    """First value of a request header (names arrive lower-cased in ASGI)."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def is_json(scope: Scope) -> bool:
    """LMDeploy's validate_json_request: media type must be application/json."""
    value = header(scope, b"content-type")
    if value is None:
        return False
    return value.split(b";", 1)[0].strip().lower() == JSON_TYPE
