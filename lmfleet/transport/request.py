"""The routed request's JSON body, parsed at most once, by whichever reader needs it first.

Three readers want the body: the proxy (a malformed JSON body is answered 400
before any routing), the router (the model, the weight-version asks, the affinity
key) and DistServe (`n`, and the body it rewrites for its two phases). Each reads
it through `json_body`, which parses once and keeps the result on the request
(`PARSED_BODY`), so whichever door the request came through, it is parsed once or
not at all: the router's fast path settles the common case without parsing
(`transport/router.py`, `_names_model`).
"""

from __future__ import annotations

import itertools
import json
import secrets
from typing import Any

import httpx2

from lmfleet.wire.headers import set_header

PARSED_BODY = "lmfleet.parsed_body"
"""Request extension: the body as parsed JSON (any JSON value), present once parsed."""

REQUEST_ID_HEADER = "x-lmfleet-request-id"
REQUEST_ID_NAME = REQUEST_ID_HEADER.encode()
"""On every routed answer: the fleet's id of the request (`fleet.abort(request_id)`).
A caller may choose it by sending the same header."""
REQUEST_ID = "lmfleet.request_id"
"""Request extension: the request's id, set by the router."""
_PREFIX = secrets.token_hex(4)
_SERIAL = itertools.count(1)


def new_request_id() -> str:
    """A request id unique to this process and, with its random prefix, to the fleet's
    proxies and clients together (`3f9a1c2e-17`): a counter, not a uuid, for speed."""
    return f"{_PREFIX}-{next(_SERIAL)}"


def with_request_id(request: httpx2.Request, response: httpx2.Response) -> httpx2.Response:
    """`response`, carrying the request's id (`REQUEST_ID_HEADER`) when it has one."""
    found = request.extensions.get(REQUEST_ID)
    if found is not None:
        set_header(response.headers, REQUEST_ID_NAME, found.encode())
    return response


def parse_json(content: bytes) -> tuple[Any, str | None]:
    """(the JSON value, None), or (None, what is wrong with it): the one parse."""
    try:
        return json.loads(content), None
    except ValueError as exc:
        return None, f"The request body is not valid JSON: {exc}"


def body_bytes(request: httpx2.Request) -> bytes:
    """The request's body as it is in memory; empty for none, and for a streamed
    upload never read (routing does not read one: it is forwarded as it streams)."""
    try:
        return request.content
    except httpx2.RequestNotRead:
        return b""


def json_body(request: httpx2.Request) -> dict[str, Any] | None:
    """The request's JSON object body, or None (empty, not JSON, not an object, or a
    streamed upload that was never read); parsed on first use, then kept."""
    extensions = request.extensions
    if PARSED_BODY in extensions:
        body = extensions[PARSED_BODY]
    else:
        content = body_bytes(request)
        body = parse_json(content)[0] if content else None
        extensions[PARSED_BODY] = body
    return body if isinstance(body, dict) else None
