"""Response bodies that hold a node's lease until they are closed.

As in httpcore's pool, a request's slot is released when the response *stream*
closes, not when headers arrive: with SSE most of a request lives after the
headers, and least-connections must see it. The sync and async wrappers are thin
twins over one `Accounting` object, so the bookkeeping exists once.

The lease ends with the request's real outcome (lmfleet/node/outliers.py): the answer's
status decides it, a body cut by the node is a failure, and only a 2xx read to
its end gives a latency sample (a caller who closes a stream early still gives
its TTFT).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeGuard

import httpx2

from lmfleet.errors import StreamInterruptedError
from lmfleet.node.outliers import Outcome, outcome_of_status
from lmfleet.registry import NodeRegistry
from lmfleet.transport import tracing


class Accounting:
    """One request's lease on one node: ends exactly once, with the request's outcome."""

    __slots__ = (
        "_chunks",
        "_done",
        "_first",
        "_registry",
        "callers_read",
        "complete",
        "request_span",
        "span",
        "sse",
        "started",
        "url",
    )

    def __init__(self, registry: NodeRegistry, url: str) -> None:
        self._registry = registry
        self.url = url
        self.started = time.monotonic()
        self._first: float | None = None
        self._done = False
        self._chunks = 0
        self.sse = False  # set for event streams: their chunks count as tokens
        self.complete = False  # the body was read to its end
        self.callers_read = False  # a read timeout is the caller's: no mark (plan.py)
        self.span: Any = None  # the attempt's span while tracing (transport/tracing.py)
        self.request_span: Any = None  # the request's, when this lease holds its answer

    def chunk(self) -> None:
        self._chunks += 1
        if self._first is None:
            self._first = time.monotonic()
            if self.span is not None:
                self.span.add_event("first_byte")

    def pieces(self, count: int) -> bool:
        """`count` chunks arrived at once (the proxy's fast lane relays them so); True
        when they are the first."""
        first = self._first is None
        if first:
            self.chunk()
            count -= 1
        self._chunks += count
        return first

    def finish(self, outcome: Outcome) -> None:
        if self._done:
            return
        self._done = True
        success = outcome is Outcome.SUCCESS
        ttft = None if self._first is None or not success else self._first - self.started
        latency = time.monotonic() - self.started if success and self.complete else None
        tokens = self._chunks if self.sse else 0  # LMDeploy streams about a token per chunk
        self._registry.release(self.url, outcome, latency=latency, ttft=ttft, tokens=tokens)
        if self.span is not None:
            failed = "the node failed" if outcome is Outcome.FAILURE else None
            tracing.end(self.span, failed, **{"lmfleet.outcome": outcome.name.lower()})
            if self.request_span is not None:
                tracing.end(self.request_span, failed)

    def gave_up(self, exc: object) -> TypeGuard[httpx2.ReadTimeout]:
        """Whether `exc` is the caller giving up: its own read timeout expired
        (`callers_read`), no mark against the node (plan.py `transport_failed`)."""
        return self.callers_read and isinstance(exc, httpx2.ReadTimeout)

    def interrupted(self, exc: Exception) -> Exception:
        """Account the failure and say what the caller gets instead of `exc`: a gap
        past the caller's own read timeout is the caller giving up, not the node
        failing (`gave_up`), and any timeout keeps its type."""
        self.finish(Outcome.NEUTRAL if self.gave_up(exc) else Outcome.FAILURE)
        if isinstance(exc, httpx2.TimeoutException):
            return exc
        return StreamInterruptedError(
            f"node {self.url} failed after the response had started; "
            f"a started response is never replayed: {exc!r}"
        )


class _Leased:
    """A node's response body that holds its lease until closed; the sync and async
    wrappers differ only in how they iterate and close (the accounting is shared)."""

    def __init__(self, inner: Any, accounting: Accounting, outcome: Outcome) -> None:
        self._inner = inner
        self._acct = accounting
        self._outcome = outcome


class LeasedStream(_Leased, httpx2.SyncByteStream):
    _inner: httpx2.SyncByteStream

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                self._acct.chunk()
                yield chunk
        except httpx2.TransportError as exc:
            error = self._acct.interrupted(exc)
            if error is exc:
                raise
            raise error from exc
        self._acct.complete = True

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._acct.finish(self._outcome)


class AsyncLeasedStream(_Leased, httpx2.AsyncByteStream):
    _inner: httpx2.AsyncByteStream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                self._acct.chunk()
                yield chunk
        except httpx2.TransportError as exc:
            error = self._acct.interrupted(exc)
            if error is exc:
                raise
            raise error from exc
        self._acct.complete = True

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._acct.finish(self._outcome)


def lease_response(response: httpx2.Response, accounting: Accounting) -> httpx2.Response:
    """Make `response`'s body hold the lease; a body already read ends it at once.

    The outcome comes from the status; a transport error while reading overrides it.
    """
    outcome = outcome_of_status(response.status_code)
    accounting.sse = response.headers.get("content-type", "").startswith("text/event-stream")
    if response.is_closed:
        accounting.chunk()
        accounting.complete = True
        accounting.finish(outcome)
    elif isinstance(response.stream, httpx2.AsyncByteStream) and not isinstance(
        response.stream, httpx2.SyncByteStream
    ):
        response.stream = AsyncLeasedStream(response.stream, accounting, outcome)
    else:
        assert isinstance(response.stream, httpx2.SyncByteStream)
        response.stream = LeasedStream(response.stream, accounting, outcome)
    return response
