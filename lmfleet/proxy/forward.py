"""The hot path: one client request, forwarded raw through the fleet's router.

Raw bytes in, raw bytes out. The body is parsed at most once, only to reject
malformed JSON and unknown models, and the parsed dict is handed to the router so
it does not parse again. The upstream response is streamed chunk by chunk and is
always closed (client disconnect included), which frees the node's in-flight slot
and cancels the upstream request.

A response that started is never replayed. When its node cuts it, the proxy logs
one warning naming the node and still ends the response as ASGI requires (uvicorn
would otherwise log "ASGI callable returned without completing response" as well):
an event stream ends with an OpenAI-shaped error event, which openai clients raise
as `APIError` with our message, so the caller sees an error rather than a short
answer; another body of unknown length just ends. Only a body of declared length
cannot end early: there the connection is dropped, and uvicorn logs that too.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
import httpx2

import lmfleet.answers as answers
from lmfleet.answers import error_body
from lmfleet.errors import (
    FleetBusyError,
    RoutingError,
)
from lmfleet.node.outliers import Outcome
from lmfleet.priority import PRIORITY_FIELD, PRIORITY_HEADER
from lmfleet.proxy.asgi import (
    BodyTimeout,
    BodyTooLarge,
    ClientGone,
    Receive,
    Scope,
    Send,
    read_body,
)
from lmfleet.transport import tracing
from lmfleet.transport.plan import (
    ANSWER_KIND,
    FIRST_ATTEMPT,
    GIVE_UP,
    OWN_TIMEOUT,
    REQUEST_SPAN,
)
from lmfleet.transport.request import PARSED_BODY, parse_json
from lmfleet.wire.headers import Triples, headers_from

if TYPE_CHECKING:
    from lmfleet.proxy.context import ProxyContext
    from lmfleet.proxy.exchanges import Exchange

log = logging.getLogger("lmfleet.proxy")

PLACEHOLDER = "http://lmfleet.invalid"

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"proxy-connection",
        b"host",
        b"content-length",
    }
)
"""Request headers that describe one hop, never forwarded (content-length is recomputed)."""

HOP_BY_HOP_AND_KEY = HOP_BY_HOP | {b"authorization"}
"""With `--api-keys`, the caller's key is the proxy's, not the node's: dropped too."""

RESPONSE_DROP = frozenset(HOP_BY_HOP - {b"content-length"})
"""The body is forwarded raw, so the node's content-length stays true and is kept."""


EVENT_STREAM = b"text/event-stream"

EVENT_END = (b"\n\n", b"\r\n\r\n", b"\r\r")
"""What the last chunk ends with when it ends an event (SSE dispatches on a blank line)."""


PRIORITY_HEADER_BYTES = PRIORITY_HEADER.encode()


def _request_headers(
    scope: Scope, drop_auth: bool, priorities: Mapping[bytes, bytes], body: object
) -> Triples:
    """The caller's headers for the node, as httpx2 keeps them (lmfleet/wire/headers.py;
    ASGI names are lowercase already): hop-by-hop ones and the proxy's own key
    dropped, and the default priority of the caller's key (`key_priorities`) added
    when the request gives none (no header, no field in its parsed `body`)."""
    drop = HOP_BY_HOP_AND_KEY if drop_auth else HOP_BY_HOP
    headers = [(k, k, v) for k, v in scope["headers"] if k not in drop]
    if priorities and not (isinstance(body, dict) and PRIORITY_FIELD in body):
        given = dict(scope["headers"])
        default = priorities.get(given.get(b"authorization", b""))
        if default is not None and PRIORITY_HEADER_BYTES not in given:
            headers.append((PRIORITY_HEADER_BYTES, PRIORITY_HEADER_BYTES, default))
    return headers


def _parse(scope: Scope, body: bytes) -> tuple[dict[str, Any], str | None]:
    """The request extensions that carry a JSON body parsed here (none for a body
    sent as something else: the router parses it if it needs to), or a malformed
    JSON body's problem."""
    if not body:
        return {}, None
    for key, value in scope["headers"]:
        if key == b"content-type" and b"json" not in value.lower():
            return {}, None  # multipart, octet-stream: forwarded as is
    parsed, problem = parse_json(body)
    return {PARSED_BODY: parsed}, problem


def _placeholder_url(rt: ProxyContext, scope: Scope) -> httpx2.URL:
    """The request's URL before routing; parsed once per path (the router re-aims it)."""
    path = scope.get("raw_path") or scope["path"].encode()  # raw_path: optional in ASGI
    query = scope.get("query_string", b"")
    return rt.urls(PLACEHOLDER, path + b"?" + query if query else path)


async def forward(scope: Scope, receive: Receive, send: Send, rt: ProxyContext) -> None:
    request: httpx2.Request | None = None
    response: httpx2.Response | None = None
    try:
        # The whole exchange runs in one scope that the proxy's sweep cancels when
        # the body is late or the caller disconnects (lmfleet/proxy/exchanges.py): a
        # caller that gives up while its request waits for a node leaves the
        # admission queue (the plan's generator is closed), and one that gives up on
        # an answer being made frees the node (the upstream request is closed).
        with rt.exchanges.open(receive, rt.options.body_timeout) as exchange:
            request = await _read_request(scope, receive, send, rt, exchange)
            if request is not None:
                started = time.monotonic()
                response = await _route(request, send, rt)
                if response is not None:
                    await _relay(response, request.url, send, rt, started)
    finally:
        if response is not None:  # outside the exchange's scope: never cut short
            await response.aclose()
        if FIRST_ATTEMPT in scope:
            await _unjudged(scope, request)
        if REQUEST_SPAN in scope:
            _unadopted(scope, request)
    if exchange.body_late:
        raise BodyTimeout


async def _unjudged(scope: Scope, request: httpx2.Request | None) -> None:
    """Let go of the fast lane's attempt when no plan judged it (the request was
    answered before routing, or went to a plan that does not take one): its lease
    ends neutral and its answer, if any, is closed."""
    made = scope.pop(FIRST_ATTEMPT)
    if request is not None and FIRST_ATTEMPT not in request.extensions:
        return  # judged by the plan (it pops it)
    _, lease, reply = made
    lease.finish(Outcome.NEUTRAL)
    if isinstance(reply, httpx2.Response):
        await reply.aclose()


def _unadopted(scope: Scope, request: httpx2.Request | None) -> None:
    """End the fast lane's request span when no plan went on with it (the request was
    answered before routing)."""
    span = scope.pop(REQUEST_SPAN)
    if request is None or REQUEST_SPAN in request.extensions:
        tracing.end(span, "answered before routing")


async def _read_request(
    scope: Scope, receive: Receive, send: Send, rt: ProxyContext, exchange: Exchange
) -> httpx2.Request | None:
    """The request to route, or None once the caller was answered (or went away)."""
    try:
        body = await read_body(scope, receive, rt.options.max_body_bytes, timeout=None)
    except BodyTooLarge:
        message = f"The request body is over {rt.options.max_body_bytes} bytes."
        await rt.answer(send, answers.BODY_TOO_LARGE, message)
        return None
    except ClientGone:
        return None
    exchange.body_read()
    parsed, problem = _parse(scope, body)
    if problem is not None:
        await rt.answer(send, answers.BAD_JSON, problem)
        return None
    headers = _request_headers(
        scope, bool(rt.options.api_keys), rt.key_priorities, parsed.get(PARSED_BODY)
    )
    headers.append((b"content-length", b"content-length", b"%d" % len(body)))
    # Built from a stream with its length given, as a server builds one: httpx2's
    # `content=` path encodes the body again and rebuilds the headers twice to add
    # Host and Content-Length (the Host is the node's, set when it is picked).
    request = httpx2.Request(
        scope["method"],
        _placeholder_url(rt, scope),
        headers=headers_from(headers),
        stream=httpx2.ByteStream(body),
        # The `timeout` extension is the proxy's upstream timeout; the caller's own
        # (its headers) bounds its wait for a node.
        extensions={"timeout": rt.timeout, GIVE_UP: rt.give_up, OWN_TIMEOUT: True, **parsed},
    )
    span = scope.get(REQUEST_SPAN)
    if span is not None:  # the fast lane's request span, for the plan to go on with
        request.extensions[REQUEST_SPAN] = span
    made = scope.get(FIRST_ATTEMPT)
    if made is not None:  # the fast lane's attempt, for the plan to judge first
        request.extensions[FIRST_ATTEMPT] = made
        reply = made[2]
        if isinstance(reply, (httpx2.RequestError, httpx2.Response)):
            reply.request = request  # made without one
    request.read()  # `content` for the router (a ByteStream: no copy)
    return request


async def _route(request: httpx2.Request, send: Send, rt: ProxyContext) -> httpx2.Response | None:
    """The node's answer, or None once a routing outcome was answered to the caller
    (its row of the answers table: lmfleet/answers.py)."""
    try:
        return await rt.transport.handle_async_request(request)
    except (httpx2.TransportError, RoutingError) as exc:
        row = answers.routed(exc, stopping=rt.stopping)
        if row is None:
            raise
        retry_after = exc.retry_after if isinstance(exc, FleetBusyError) else None
        await rt.answer(send, row, row.message(exc), retry_after=retry_after)
    return None


async def _relay(
    response: httpx2.Response,
    target: httpx2.URL,
    send: Send,
    rt: ProxyContext,
    started: float,
) -> None:
    node = f"{target.scheme}://{target.netloc.decode('ascii')}"
    decided = response.extensions.get(ANSWER_KIND)
    if decided is not None:  # an answer of the table, made without a node
        rt.metrics.error(decided)
    headers = []
    length = -1
    sse = False
    for key, value in response.headers.raw:
        lower = key.lower()
        if lower not in RESPONSE_DROP:
            headers.append((key, value))
            if lower == b"content-length" and value.isdigit():
                length = int(value)
            elif lower == b"content-type":
                sse = value.lower().startswith(EVENT_STREAM)
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    if length >= 0:
        # A sized body (a non-streaming answer) arrives with its head: it is sent on
        # whole, even while the proxy stops.
        await _copy(response, send, rt, node, started, length, sse)
        return
    # A body of unknown length (a stream) may last minutes: a stopping proxy ends it
    # at once, with an error event the caller's SDK raises (ProxyContext.stop).
    with anyio.CancelScope() as stop:
        rt.streams.add(stop)
        try:
            if rt.stopping:
                stop.cancel()
            await _copy(response, send, rt, node, started, length, sse)
        finally:
            rt.streams.discard(stop)
    if stop.cancelled_caught:
        # Where the cut fell is not known here (`last` None).
        tail = cut_tail(rt, answers.SHUTTING_DOWN, STREAM_STOPPED, sse=sse, last=None)
        await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _copy(
    response: httpx2.Response,
    send: Send,
    rt: ProxyContext,
    node: str,
    started: float,
    length: int,
    sse: bool,
) -> None:
    """Send the body on as it arrives; `length` is its size, or -1 (until the node ends it)."""
    first: float | None = None
    more = True
    last = b""
    try:
        stream = response.stream
        assert isinstance(stream, httpx2.AsyncByteStream)
        async for chunk in stream:
            if first is None:
                first = time.monotonic()
                rt.metrics.ttft(node, first - started)
            if length >= 0:
                length -= len(chunk)
                more = length > 0
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
            last = chunk
    except (httpx2.TransportError, RoutingError) as exc:
        row = answers.cut(exc)
        log.warning("stream from %s cut after it started: %r", node, exc)
        tail = cut_tail(rt, row, row.message(exc), sse=sse, last=last)
        if length < 0:  # see the module docstring; a sized body cannot end early
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        return
    if more:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    rt.metrics.latency(node, time.monotonic() - started)


STREAM_STOPPED = "The proxy is shutting down; this stream was cut. Try again."


def cut_tail(
    rt: ProxyContext, row: answers.Answer, message: str, *, sse: bool, last: bytes | None
) -> bytes:
    """Count a stream cut as `row`, and the bytes that end it: for an event stream,
    the error event (`error_event`), after a blank line when the cut fell inside an
    event (`last`, the last chunk relayed, does not end one) or where that is not
    known (`last` None); nothing for another body."""
    rt.metrics.error(row.kind)
    if not sse:
        return b""
    inside = last is None or (bool(last) and not last.endswith(EVENT_END))
    return error_event(row, message, inside_event=inside)


def error_event(row: answers.Answer, message: str, *, inside_event: bool) -> bytes:
    """The event that ends a cut event stream: `data: {"error": {...}}`, as vLLM and
    SGLang send mid-stream errors and openai clients raise them. A blank line first
    when the cut fell inside an event, so that this one is parsed on its own."""
    body = error_body(message, code=row.status, type=row.error_type)
    event = b"data: " + json.dumps({"error": body}).encode() + b"\n\n"
    return b"\n\n" + event if inside_event else event
