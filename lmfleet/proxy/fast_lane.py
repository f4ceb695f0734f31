"""The proxy's fast lane: a plain request's first attempt, made by the front door itself.

Most of what the proxy serves is one shape: a chat or completions request, its JSON
body in, a model served under that name, nothing asked of routing but a node. For
that shape the pipeline's adapters (the ASGI app, an httpx2 request and response,
the plan's generator of steps, a cancel scope per exchange, a leased stream) cost
about as much CPU as the routing and the relay themselves (docs/benchmarks.md,
"The fast lane"). Here the front door leases a node from the same registry by the
same strategy, sends on the same upstream pool through the same codec, and relays
the answer's pieces to the caller's connection as they come.

The lane makes only the first attempt, and only when it can start at once. It
hands the request to the pipeline, with nothing sent to the caller, when:

- the request is not plain (`Router.plain_info`, plus its headers: a key the proxy
  must check and does not accept, an `x-lmfleet-*` ask, a body that is not JSON):
  the pipeline answers or routes it as it would any other;
- no node can take it now, or every upstream connection is busy: the pipeline
  waits for one, in the admission queue or the pool's;
- the attempt failed before any byte reached the caller (the node unreachable, the
  connection dropped, no first byte in time, a status in `retry_status`): the
  request goes with the attempt (`FIRST_ATTEMPT`), which the plan judges by its own
  rules first, as if it had made it, and fails over from there.

So failover, waiting and every answer of the table stay the pipeline's, once. What
the lane does itself is what every answered request needs: the lease released
with its outcome, the weight-version and request-id headers, the proxy's metrics,
its traces when OpenTelemetry is on (the plan's request and attempt spans, opened
by the same functions; a request handed over takes its span along, `REQUEST_SPAN`),
the caller's disconnect (the front door cancels the lane's task: the node's
connection is closed, which frees its slot), a stream cut by the node or by a
stopping proxy ending with the same error event as forward.py's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx2

import lmfleet.answers as answers
from lmfleet.node.client import node_headers
from lmfleet.node.outliers import Outcome, outcome_of_status
from lmfleet.node.state import NodeState
from lmfleet.proxy.asgi import BodyTimeout, Scope
from lmfleet.proxy.context import key_accepted
from lmfleet.proxy.forward import (
    EVENT_STREAM,
    HOP_BY_HOP,
    RESPONSE_DROP,
    STREAM_STOPPED,
    cut_tail,
)
from lmfleet.routing.base import RequestInfo
from lmfleet.transport import tracing
from lmfleet.transport.plan import (
    FIRST_ATTEMPT,
    REQUEST_SPAN,
    SERVED_VERSION_NAME,
    attempt_read_timeout,
    open_attempt_span,
    open_request_span,
    parse_timeout,
)
from lmfleet.transport.request import REQUEST_ID_NAME, new_request_id
from lmfleet.transport.router import ASK_PREFIX, PLAIN_ASKS, Router
from lmfleet.transport.streams import Accounting
from lmfleet.wire.codec import Http1Error, encode_request_head
from lmfleet.wire.headers import headers_from
from lmfleet.wire.upstream import Exchanged, Http11Transport, Origin

if TYPE_CHECKING:
    from lmfleet.proxy.context import ProxyContext
    from lmfleet.proxy.front_door import Cycle

log = logging.getLogger("lmfleet.proxy")

_AUTHORIZATION = b"authorization"
_CONTENT_TYPE = b"content-type"
_TRACE_HEADERS = frozenset(name.encode() for name in tracing.TRACE_HEADERS)

_Aim = tuple[Origin, list[tuple[bytes, bytes]], frozenset[bytes]]
"""Where a node is reached, the headers every request to it carries (its Host, its
own key and headers) as bytes, and the names of its own ones."""


class _Cut:
    """A relayed stream as `ProxyContext.stop` cuts it: the lane's task is cancelled
    and knows, by `stopped`, that the proxy stops (not that the caller left)."""

    __slots__ = ("stopped", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.stopped = False

    def cancel(self) -> None:
        self.stopped = True
        self.task.cancel()


class FastLane:
    """The front door's way for plain requests (see the module docstring); one per
    running proxy app, made at its startup when the fleet routes as a `Router`."""

    def __init__(
        self,
        rt: ProxyContext,
        router: Router,
        pool: Http11Transport,
        *,
        keys: list[bytes],
        public: frozenset[str],
    ) -> None:
        """`keys`: the `Authorization` values the proxy accepts (empty: any), except on
        `public` paths."""
        self._rt = rt
        self._router = router
        self._registry = router.registry
        self._strategy = router.strategy
        self._pool = pool
        self._keys = keys
        self._public = public
        self.max_body = rt.options.max_body_bytes
        self.body_timeout = rt.options.body_timeout
        """Seconds a caller may take to send its body (the front door holds a request
        for the lane until it is in)."""
        self._retry_status = router.options.retry_status
        self._read, _ = attempt_read_timeout(
            rt.timeout.get("read"), router.options.first_byte_timeout
        )
        self._aims: dict[tuple[str, str | None, tuple[tuple[str, str], ...]], _Aim] = {}
        self._routing = router.routing
        self._tracing = router.routing.tracer is not None

    async def late(self, scope: Scope, cycle: Cycle) -> None:
        """The 408 of a request whose body missed `body_timeout`, as the pipeline's."""
        row = answers.BODY_TIMEOUT
        self._rt.metrics.request(scope["path"])
        await self._rt.answer(cycle.send, row, row.message(BodyTimeout()))

    async def serve(self, scope: Scope, cycle: Cycle, body: bytes) -> bool:
        """Answer the request; or False, with nothing sent, for the pipeline to take it
        (with `scope[FIRST_ATTEMPT]` when an attempt was made)."""
        plain = self._plain(scope, body)
        if plain is None:
            return False
        info, headers, request_id = plain
        rt, registry = self._rt, self._registry
        started = time.monotonic()
        node = registry.lease(self._strategy, info)
        if node is None:
            return False  # the pipeline waits for one
        if registry.wake_asked:  # a better tier sleeps: wake it (as `Attempts.lease` does)
            registry.wake_asked = False
            self._routing.starved(info)
        lease = Accounting(registry, node.url)
        rid = request_id or new_request_id().encode()
        span = self._trace(scope, info, node, lease, headers, rid) if self._tracing else None
        rt.metrics.forwarding(+1)
        try:
            try:
                answer = await self._attempt(scope, node, headers, body)
            except BaseException:
                lease.finish(Outcome.NEUTRAL)  # the caller went away: no mark on the node
                if span is not None:
                    tracing.end(span, "the caller went away")
                raise
            if answer is None:
                lease.finish(Outcome.NEUTRAL)
                self._hand_over(scope, span, request_id, rid)
                return False  # not sent: the pipeline queues for a connection
            if not isinstance(answer, Exchanged):  # failed while no byte reached the caller
                scope[FIRST_ATTEMPT] = (node, lease, answer)
                self._hand_over(scope, span, request_id, rid)
                rt.metrics.lane("failed_over")
                return False
            rt.metrics.request(scope["path"])
            rt.metrics.lane("answered")
            lease.request_span = span  # ended with the answer, as the plan's (settle)
            await self._relay(cycle, answer, node, lease, rid, started)
            return True
        finally:
            rt.metrics.forwarding(-1)

    @staticmethod
    def _hand_over(scope: Scope, span: Any, given: bytes | None, request_id: bytes) -> None:
        """Leave the request's span to the pipeline's plan, which goes on with it, with
        the id the span names (the caller's, or the one the lane chose)."""
        if span is None:
            return
        scope[REQUEST_SPAN] = span
        if given is None:
            scope["headers"].append((REQUEST_ID_NAME, request_id))

    def _trace(
        self,
        scope: Scope,
        info: RequestInfo,
        node: NodeState,
        lease: Accounting,
        headers: list[tuple[bytes, bytes]],
        request_id: bytes,
    ) -> Any:
        """The request's span and its first attempt's, as the plan opens them
        (transport/plan.py); the node gets the attempt's context in place of the
        caller's (`_plain` kept the caller's apart, in the scope)."""
        given = {
            n.decode("latin-1"): v.decode("latin-1")
            for n, v in scope["headers"]
            if n in _TRACE_HEADERS
        }
        span = open_request_span(
            self._routing, "POST", scope["path"], given, request_id.decode("latin-1"), info
        )
        lease.span = open_attempt_span(self._routing, span, self._strategy, info, node, 1)
        carrier: dict[str, str] = {}
        tracing.inject(carrier, lease.span)
        headers += [(n.encode(), v.encode("latin-1")) for n, v in carrier.items()]
        return span

    def _plain(
        self, scope: Scope, body: bytes
    ) -> tuple[RequestInfo, list[tuple[bytes, bytes]], bytes | None] | None:
        """What routing knows of a plain request, the headers it forwards and the id it
        chose, if any; None for a request the pipeline must take."""
        headers: list[tuple[bytes, bytes]] = []
        given = b""
        request_id: bytes | None = None
        for name, value in scope["headers"]:
            if name == _AUTHORIZATION:
                given = value
                if self._keys:
                    continue  # the proxy's key, not the node's
            elif name in HOP_BY_HOP:
                continue
            elif name == _CONTENT_TYPE and b"json" not in value.lower():
                return None
            elif name.startswith(ASK_PREFIX):
                if name not in PLAIN_ASKS:
                    return None  # an ask of routing's
                if name == REQUEST_ID_NAME:
                    request_id = value
                elif not _is_timeout(value):
                    return None  # the pipeline's `bad_timeout`
            elif name in _TRACE_HEADERS and self._tracing:
                continue  # the node gets the attempt's own context (`_trace`)
            headers.append((name, value))
        keyed = self._keys and scope["path"] not in self._public
        if keyed and not key_accepted(given, self._keys):
            return None  # the app's 401
        if given in self._rt.key_priorities or len(body) > self.max_body:
            return None  # a priority for the pipeline to add; the pipeline's 413
        try:
            parsed = json.loads(body)
        except ValueError:
            return None  # the pipeline's 400
        if not isinstance(parsed, dict):
            return None
        info = self._router.plain_info(scope["path"], parsed)
        return None if info is None else (info, headers, request_id)

    async def _attempt(
        self, scope: Scope, node: NodeState, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Exchanged | httpx2.Response | httpx2.TransportError | None:
        """Send the request to `node`: its answer, with a stream's first body bytes in;
        or what failed it while no byte reached the caller (a transport error, or an
        answer whose status is in `retry_status`), for the plan to judge; or None when
        it was not sent (every upstream connection busy, a head that cannot be written)."""
        origin, aimed, own = self._aim(node)
        query = scope["query_string"]
        target = scope["raw_path"] + b"?" + query if query else scope["raw_path"]
        if own:  # the node's key and headers replace the caller's of those names
            headers = [(name, value) for name, value in headers if name not in own]
        headers += aimed
        headers.append((b"content-length", b"%d" % len(body)))
        try:
            payload = encode_request_head(b"POST", target, headers) + body
        except Http1Error:
            return None  # the pipeline's LocalProtocolError
        got, conn = self._pool.checkout_now(origin)
        if not got:
            return None
        try:
            answer = await self._pool.exchange(
                origin,
                conn,
                payload,
                read_timeout=self._read,
                connect_timeout=self._rt.timeout.get("connect"),
            )
        except httpx2.TransportError as exc:
            return exc
        head = answer.head
        if head.status in self._retry_status:
            return httpx2.Response(
                head.status, headers=headers_from(head.headers), stream=answer.stream()
            )
        if not answer.first and head.framing != "length" and not answer.parser.done:
            # A stream's first byte is under the first-byte bound too (a hung engine
            # sends the head at once and then nothing): the pipeline's
            # `Call(first_byte=True)`.
            try:
                answer.first = await answer.more()
            except httpx2.TransportError as exc:
                answer.close()
                return exc
            except BaseException:
                answer.close()
                raise
        return answer

    def _aim(self, node: NodeState) -> _Aim:
        """Where `node` is reached and what every request to it carries (kept per node:
        its address, key and headers)."""
        key = (node.url, node.api_key, node.headers)
        aim = self._aims.get(key)
        if aim is None:
            url = urlsplit(node.url)  # `http://host:port`, checked when it was added
            scheme, netloc = url.scheme, url.netloc
            origin = (scheme, url.hostname or "", url.port or (443 if scheme == "https" else 80))
            own = [(n.lower().encode(), v.encode()) for n, v in node_headers(node)]
            if len(self._aims) > 1024:
                self._aims.clear()
            names = frozenset(name for name, _ in own)
            aim = self._aims[key] = (origin, [(b"host", netloc.encode()), *own], names)
        return aim

    async def _relay(
        self,
        cycle: Cycle,
        answer: Exchanged,
        node: NodeState,
        lease: Accounting,
        request_id: bytes,
        started: float,
    ) -> None:
        """Relay the node's answer to the caller; the lease ends with its outcome, and
        gives a latency sample only when the answer was relayed whole."""
        rt, url, head = self._rt, node.url, answer.head
        headers = []
        sse = False
        for name, lower, value in head.headers:
            if lower not in RESPONSE_DROP:
                headers.append((name, value))
                if lower == _CONTENT_TYPE:
                    sse = lease.sse = value.lower().startswith(EVENT_STREAM)
        headers.append((SERVED_VERSION_NAME, b"%d" % node.weight_version))
        headers.append((REQUEST_ID_NAME, request_id))
        cut: _Cut | None = None
        last = b""  # the last piece relayed: did the cut fall inside an event?
        try:
            pieces = answer.first
            self._arrived(lease, url, started, pieces)
            if head.framing == "length" or answer.parser.done:
                # A sized answer: read whole, then head and body in one write.
                while more := await answer.more():
                    self._arrived(lease, url, started, more)
                    pieces = pieces + more
                body = b"".join(pieces)
                if head.framing in ("chunked", "close"):  # all in already: sized now
                    headers.append((b"content-length", b"%d" % len(body)))
                cycle.whole(head.status, headers, body)
            else:
                cut = self._cuttable()
                cycle.stream(head.status, headers)
                while True:
                    if pieces:
                        if not await cycle.writable():
                            return  # the caller is gone
                        cycle.pieces(pieces)
                        last = pieces[-1]
                    pieces = await answer.more()
                    if not pieces:
                        break
                    self._arrived(lease, url, started, pieces)
                cycle.pieces([], last=True)
            lease.complete = True
        except httpx2.TransportError as exc:
            error = lease.interrupted(exc)  # the node's failure, or the read timeout's
            row = answers.cut(error)
            log.warning("stream from %s cut after it started: %r", url, error)
            tail = cut_tail(rt, row, row.message(error), sse=sse, last=last)
            if cut is None:
                cycle.drop()  # a sized answer cannot end early (see forward.py)
            else:
                cycle.pieces([tail], last=True)
            return
        except asyncio.CancelledError:
            if cut is None or not cut.stopped:
                raise  # the caller went away: `finally` frees the node
            uncancel = getattr(cut.task, "uncancel", None)  # 3.11+: no longer cancelling
            if uncancel is not None:
                uncancel()
            tail = cut_tail(rt, answers.SHUTTING_DOWN, STREAM_STOPPED, sse=sse, last=None)
            cycle.pieces([tail], last=True)
            return
        finally:
            if cut is not None:
                rt.streams.discard(cut)
            answer.close()
            lease.finish(outcome_of_status(head.status))  # once: a no-op after a cut
        rt.metrics.latency(url, time.monotonic() - started)

    def _cuttable(self) -> _Cut:
        """This task as a stream `ProxyContext.stop` cuts (at once when it stops already)."""
        task = asyncio.current_task()
        assert task is not None
        cut = _Cut(task)
        self._rt.streams.add(cut)
        if self._rt.stopping:
            cut.cancel()
        return cut

    def _arrived(self, lease: Accounting, url: str, started: float, pieces: list[bytes]) -> None:
        """Body pieces came; the first ones give the proxy's TTFT of the node."""
        if pieces and lease.pieces(len(pieces)):
            self._rt.metrics.ttft(url, time.monotonic() - started)


def _is_timeout(value: bytes) -> bool:
    """Whether an `x-lmfleet-timeout` value reads as one (`parse_timeout`)."""
    try:
        parse_timeout(value)
    except ValueError:
        return False
    return True
