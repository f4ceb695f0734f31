"""`DistServePlan`: one request's way through a prefill node and a decode node.

    lease prefill node (strategy among Prefill nodes)
      -> POST the prefill copy (max_tokens=1, stream=false, with/preserve_cache)
      -> release the prefill lease; read id, cache_block_ids, remote_token_ids
    lease decode node (strategy among Decode nodes)
      -> connect the pair once (deduplicated; see control.DistServe.connect)
      -> POST the original request + migration_request, streaming as asked
      -> the decode lease lives until the response stream closes

Failover follows router.py's rule: only while nothing reached the caller. A
prefill node that is unreachable or answers 502/503 is replaced; a decode node
that fails (unreachable, dropped, 502/503, or the pair cannot connect) gets the
prefill cache freed and the pair dropped, and the whole request starts again
with fresh nodes, up to `max_attempts`. Any other answer, error or not, goes
back to the caller as the node gave it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any, NoReturn

import httpx2

from lmfleet.errors import MigrationError, NodeUnavailableError, NoHealthyNodeError
from lmfleet.routing.base import RequestInfo
from lmfleet.state import NodeRole, NodeState
from lmfleet.transport.distserve import protocol as wire
from lmfleet.transport.distserve.steps import Call, Discard, Pause, Steps
from lmfleet.transport.router import (
    DROPPED_ERRORS,
    FAILOVER_STATUS,
    UNREACHED_ERRORS,
    RequestPlan,
)
from lmfleet.transport.streams import Accounting, lease_response
from lmfleet.wire import error_bytes

if TYPE_CHECKING:
    from lmfleet.transport.distserve.control import DistServe

_SKIP_HEADERS = frozenset({"content-length", "host", "transfer-encoding"})
_SKIP_ANSWER_HEADERS = frozenset({"content-length", "transfer-encoding", "content-encoding"})


def rejected_n(request: httpx2.Request) -> httpx2.Response:
    """LMDeploy's 400 for `n > 1` in DistServe mode, in the OpenAI error shape."""
    return httpx2.Response(
        400,
        headers={"content-type": "application/json"},
        content=error_bytes(wire.N_REJECTED, code=400, param="n"),
        request=request,
    )


class _Retry(Exception):
    """This attempt failed before any byte reached the caller; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DistServePlan:
    """One disaggregated request; `steps()` is run by `drive_sync` or `drive_async`."""

    def __init__(self, ds: DistServe, base: RequestPlan, body: dict[str, Any], path: str) -> None:
        self._ds = ds
        self._router = ds.router
        self.request = base.request
        self._prefill_info = base.info
        self._decode_info = dataclasses.replace(base.info, role=NodeRole.DECODE)
        self._body = body
        self._path = path
        self._headers = [
            (k, v) for k, v in self.request.headers.raw if k.decode().lower() not in _SKIP_HEADERS
        ]
        self._tried: dict[NodeRole, list[str]] = {NodeRole.PREFILL: [], NodeRole.DECODE: []}
        self._deadline: float | None = None

    def steps(self) -> Steps[httpx2.Response]:
        options = self._router.options
        attempts = 0
        while True:
            attempts += 1
            try:
                return (yield from self._attempt())
            except _Retry as retry:
                if attempts >= options.max_attempts:
                    raise NodeUnavailableError(
                        f"DistServe: {attempts} attempt(s) failed; last: {retry.reason}",
                        request=self.request,
                    ) from None
                yield Pause(min(options.max_backoff, options.backoff * 2 ** (attempts - 1)))

    def _attempt(self) -> Steps[httpx2.Response]:
        prefill, p_lease = yield from self._lease(self._prefill_info)
        answer = yield from self._prefill(prefill, p_lease)
        if isinstance(answer, httpx2.Response):
            return answer
        decode, d_lease = yield from self._lease(self._decode_info)
        return (yield from self._decode(prefill.url, decode, d_lease, answer))

    # -- phases -------------------------------------------------------------------

    def _lease(self, info: RequestInfo) -> Steps[tuple[NodeState, Accounting]]:
        """Lease a node of `info.role`, waiting up to `wait_for_node` for one."""
        router = self._router
        assert info.role is not None
        tried = self._tried[info.role]
        while True:
            node = router.registry.lease(self._ds.strategies[info.role], info, tried)
            if node is not None:
                tried.append(node.url)
                return node, Accounting(router.registry, node.url)
            now = time.monotonic()
            if self._deadline is None:
                self._deadline = now + router.options.wait_for_node
                router.starved(info.model)
            if now >= self._deadline:
                raise NoHealthyNodeError(
                    f"no healthy {info.role.name.lower()} node within "
                    f"{router.options.wait_for_node:g} s (DistServe)",
                    request=self.request,
                )
            yield Pause(RequestPlan.poll_interval)

    def _prefill(
        self, node: NodeState, lease: Accounting
    ) -> Steps[wire.Prefilled | httpx2.Response]:
        body = wire.prefill_body(self._body, self._path)
        reply = yield Call(self._build(node, body))
        if not isinstance(reply, httpx2.Response):
            self._node_failed(lease, reply, "prefill")
        if reply.status_code in FAILOVER_STATUS:
            lease.finish(ok=False)
            self._router.registry.mark_failed(node.url, f"answered HTTP {reply.status_code}")
            raise _Retry(f"prefill node {node.url} answered HTTP {reply.status_code}")
        lease.chunk()
        if reply.status_code != 200:
            lease.finish(ok=False)
            return self._answer(reply)  # the node's own verdict (a bad request): as is
        lease.finish(ok=True)
        try:
            return wire.parse_prefill(reply.json())
        except ValueError as exc:
            raise MigrationError(f"prefill node {node.url}: {exc}", request=self.request) from exc

    def _decode(
        self, p_url: str, node: NodeState, lease: Accounting, prefilled: wire.Prefilled
    ) -> Steps[httpx2.Response]:
        ds = self._ds
        pair = (p_url, node.url)
        try:
            yield from ds.connect(pair)
        except MigrationError as exc:
            lease.finish(ok=False)
            yield from ds.drop(pair, also_free=prefilled.session_id)
            raise _Retry(str(exc)) from None
        except BaseException:
            lease.finish(ok=False)
            raise
        ds.pool.shelve(pair, prefilled.session_id)
        body = wire.decode_body(self._body, ds.protocol, p_url, prefilled)
        reply = yield Call(self._build(node, body), stream=True)
        if not isinstance(reply, httpx2.Response):
            try:
                self._node_failed(lease, reply, "decode")
            finally:
                # The decode node never took the cache: free it and drop the pair
                # (its connection state died with the node, if it did).
                yield from ds.drop(pair, also_free=prefilled.session_id)
        ds.pool.unshelve(pair, prefilled.session_id)
        if reply.status_code in FAILOVER_STATUS:
            yield Discard(reply)
            lease.finish(ok=False)
            self._router.registry.mark_failed(node.url, f"answered HTTP {reply.status_code}")
            yield from ds.drop(pair, also_free=prefilled.session_id)
            raise _Retry(f"decode node {node.url} answered HTTP {reply.status_code}")
        if reply.status_code != 200:
            # A refused migration leaves the cache on the prefill node, and may
            # mean the decode node forgot the pair (a restart): free and drop.
            yield from ds.drop(pair, also_free=prefilled.session_id)
        return lease_response(reply, lease)

    # -- helpers --------------------------------------------------------------------

    def _node_failed(self, lease: Accounting, exc: Exception | None, phase: str) -> NoReturn:
        """Account a send that raised: retry on other nodes, or re-raise (timeouts)."""
        lease.finish(ok=False)
        if isinstance(exc, UNREACHED_ERRORS):
            self._router.registry.mark_failed(lease.url, f"unreachable: {exc!r}")
        elif not isinstance(exc, DROPPED_ERRORS):
            assert exc is not None
            raise exc  # a timeout or our own error: the caller's to handle
        raise _Retry(f"{phase} node {lease.url}: {exc!r}")

    def _build(self, node: NodeState, body: dict[str, Any]) -> httpx2.Request:
        request = httpx2.Request(
            "POST",
            self.request.url,
            headers=self._headers,
            content=json.dumps(body).encode(),
            extensions={"timeout": self.request.extensions.get("timeout", {})},
        )
        request.headers["Content-Type"] = "application/json"
        self._router.target(request, node)
        return request

    def _answer(self, reply: httpx2.Response) -> httpx2.Response:
        """A read response rebuilt with a replayable body (the proxy streams it on)."""
        headers = [
            (k, v) for k, v in reply.headers.raw if k.decode().lower() not in _SKIP_ANSWER_HEADERS
        ]
        return httpx2.Response(
            reply.status_code, headers=headers, content=reply.content, request=self.request
        )
