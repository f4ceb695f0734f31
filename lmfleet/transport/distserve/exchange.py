"""`DistServePlan`: one request's way through a prefill node and a decode node.

    lease prefill node (strategy among Prefill nodes)
      -> POST the prefill copy (max_tokens=1, stream=false, with/preserve_cache)
      -> release the prefill lease; read id, cache_block_ids, remote_token_ids
    lease decode node (strategy among Decode nodes)
      -> connect the pair once (deduplicated; see control.DistServe.connect)
      -> POST the original request + migration_request, streaming as asked
      -> the decode lease lives until the response stream closes

With `dummy_prefill` (LMDeploy's `--dummy-prefill`, for profiling decode alone)
the first two steps and the pair connection are skipped: the decode node gets
the request with a dummy `migration_request` (`remote_engine_id` "dummy:dummy",
`is_dummy_prefill: true`) and generates without migrating a cache.

Failover follows plan.py's rules (its `Attempts` does the leasing, judging and
backoff): only while nothing reached the caller. A prefill node that fails
(unreachable, dropped, no first byte in time, a status in `retry_status`) is
replaced; a decode node that fails (the same, or the pair cannot connect) gets
the prefill cache freed and the pair dropped, and the whole request starts again
with fresh nodes, up to `max_attempts` nodes. Any other answer, error or not,
goes back to the caller as the node gave it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import httpx2

from lmfleet.answers import BAD_REQUEST
from lmfleet.errors import MigrationError
from lmfleet.node.outliers import Outcome, outcome_of_status
from lmfleet.node.state import NodeRole, NodeState
from lmfleet.routing.base import RequestInfo, Strategy
from lmfleet.transport import tracing
from lmfleet.transport.distserve import protocol
from lmfleet.transport.distserve.links import PairLinks
from lmfleet.transport.plan import (
    SERVED_VERSION_HEADER,
    Attempts,
    RequestPlan,
    Retry,
    error_answer,
    holding,
)
from lmfleet.transport.steps import Call, Discard, Pause, Steps
from lmfleet.transport.streams import Accounting, lease_response

_SKIP_HEADERS = frozenset({"content-length", "host", "transfer-encoding"})
_SKIP_ANSWER_HEADERS = frozenset({"content-length", "transfer-encoding", "content-encoding"})


def rejected_n(request: httpx2.Request) -> httpx2.Response:
    """LMDeploy's 400 for `n > 1` in DistServe mode, in the OpenAI error shape."""
    return error_answer(request, BAD_REQUEST, protocol.N_REJECTED, param="n")


class DistServePlan:
    """One disaggregated request; `steps()` is run by `drive_sync` or `drive_async`."""

    def __init__(
        self,
        links: PairLinks,
        strategies: Mapping[NodeRole, Strategy],
        base: RequestPlan,
        body: dict[str, Any],
        path: str,
    ) -> None:
        self._links = links
        self._strategies = strategies
        self._routing = links.routing
        self.request = base.request
        self._prefill_info = base.info
        self._decode_info = dataclasses.replace(base.info, role=NodeRole.DECODE)
        self._body = body
        self._path = path
        self._headers = [
            (k, v) for k, v in self.request.headers.raw if k.decode().lower() not in _SKIP_HEADERS
        ]
        self._tried: dict[NodeRole, list[str]] = {NodeRole.PREFILL: [], NodeRole.DECODE: []}
        self._attempts = Attempts(self._routing, self.request, label="DistServe: ")
        self._ours = self._attempts.bound(self._routing.options.first_byte_timeout)
        self._timeout = self.request.extensions.get("timeout", {})
        self._holder: Accounting | None = None
        """The lease the answer holds (the decode node's stream), once there is one."""

    def steps(self) -> Steps[httpx2.Response]:
        attempts = self._attempts
        attempts.trace(self._prefill_info)  # one request span; an attempt span per phase
        try:
            while True:
                self._holder = None
                try:
                    answer = yield from self._attempt()
                except Retry as retry:
                    yield Pause(attempts.failed(retry.reason))
                    continue
                if self._holder is not None:
                    attempts.settle(self._holder)  # the span ends with the decode's stream
                else:
                    attempts.close_span()
                return answer
        except BaseException as exc:
            attempts.close_span(exc)
            raise

    def _attempt(self) -> Steps[httpx2.Response]:
        if self._links.options.dummy_prefill:
            decode, d_lease = yield from self._lease(self._decode_info)
            return (yield from holding(d_lease, self._decode_dummy(decode, d_lease)))
        prefill, p_lease = yield from self._lease(self._prefill_info)
        answer = yield from holding(p_lease, self._prefill(prefill, p_lease))
        if isinstance(answer, httpx2.Response):
            return answer
        decode, d_lease = yield from self._lease(self._decode_info)
        return (yield from holding(d_lease, self._decode(prefill.url, decode, d_lease, answer)))

    # -- phases -------------------------------------------------------------------

    def _lease(self, info: RequestInfo) -> Steps[tuple[NodeState, Accounting]]:
        """Lease a node of `info.role`, waiting up to `wait_for_node` for one."""
        assert info.role is not None
        strategy = self._strategies[info.role]
        return (yield from self._attempts.lease(strategy, info, self._tried[info.role]))

    def _prefill(
        self, node: NodeState, lease: Accounting
    ) -> Steps[protocol.Prefilled | httpx2.Response]:
        body = protocol.prefill_body(self._body, self._path)
        reply = yield Call(self._build(node, body))
        if not isinstance(reply, httpx2.Response):
            self._attempts.transport_failed(lease, reply, "prefill node ", self._ours)
        reason = self._attempts.retryable(lease, reply, "prefill node ")
        if reason is not None:
            lease.finish(Outcome.FAILURE)
            raise Retry(reason)
        lease.chunk()
        lease.complete = True
        lease.finish(outcome_of_status(reply.status_code))
        if reply.status_code != 200:
            return self._answer(reply)  # the node's own verdict (a bad request): as is
        try:
            return protocol.parse_prefill(reply.json())
        except ValueError as exc:
            raise MigrationError(f"prefill node {node.url}: {exc}", request=self.request) from exc

    def _decode(
        self, p_url: str, node: NodeState, lease: Accounting, prefilled: protocol.Prefilled
    ) -> Steps[httpx2.Response]:
        ds = self._links
        pair = (p_url, node.url)
        try:
            yield from ds.connect(pair)
        except MigrationError as exc:
            lease.finish(Outcome.FAILURE)
            yield from ds.drop(pair, also_free=prefilled.session_id)
            raise Retry(str(exc)) from None
        except BaseException:
            lease.finish(Outcome.NEUTRAL)
            raise
        ds.pool.shelve(pair, prefilled.session_id)
        body = protocol.decode_body(self._body, ds.protocol, p_url, prefilled)
        reply = yield Call(self._build(node, body), stream=True, first_byte=True)
        if not isinstance(reply, httpx2.Response):
            try:
                self._attempts.transport_failed(lease, reply, "decode node ", self._ours)
            finally:
                # The decode node never took the cache: free it and drop the pair
                # (its connection state died with the node, if it did).
                yield from ds.drop(pair, also_free=prefilled.session_id)
        ds.pool.unshelve(pair, prefilled.session_id)
        reason = self._attempts.retryable(lease, reply, "decode node ")
        if reason is not None:
            yield Discard(reply)
            lease.finish(Outcome.FAILURE)
            yield from ds.drop(pair, also_free=prefilled.session_id)
            raise Retry(reason)
        if reply.status_code != 200:
            # A refused migration leaves the cache on the prefill node, and may
            # mean the decode node forgot the pair (a restart): free and drop.
            yield from ds.drop(pair, also_free=prefilled.session_id)
        reply.headers[SERVED_VERSION_HEADER] = str(node.weight_version)
        self._holder = lease
        return lease_response(reply, lease)

    def _decode_dummy(self, node: NodeState, lease: Accounting) -> Steps[httpx2.Response]:
        """Decode after a dummy prefill: no pair, no cache to shelve, free or drop."""
        body = protocol.dummy_decode_body(self._body, self._links.protocol)
        reply = yield Call(self._build(node, body), stream=True, first_byte=True)
        if not isinstance(reply, httpx2.Response):
            self._attempts.transport_failed(lease, reply, "decode node ", self._ours)
        reason = self._attempts.retryable(lease, reply, "decode node ")
        if reason is not None:
            yield Discard(reply)
            lease.finish(Outcome.FAILURE)
            raise Retry(reason)
        reply.headers[SERVED_VERSION_HEADER] = str(node.weight_version)
        self._holder = lease
        return lease_response(reply, lease)

    # -- helpers --------------------------------------------------------------------

    def _build(self, node: NodeState, body: dict[str, Any]) -> httpx2.Request:
        request = httpx2.Request(
            "POST",
            self.request.url,
            headers=self._headers,
            content=json.dumps(body).encode(),
            extensions={"timeout": self._timeout},
        )
        request.headers["Content-Type"] = "application/json"
        tracing.carry(self.request.headers, request.headers)  # the attempt's, once injected
        self._routing.nodes.aim(request, node)
        return request

    def _answer(self, reply: httpx2.Response) -> httpx2.Response:
        """A read response rebuilt with a replayable body (the proxy streams it on)."""
        headers = [
            (k, v) for k, v in reply.headers.raw if k.decode().lower() not in _SKIP_ANSWER_HEADERS
        ]
        return httpx2.Response(
            reply.status_code, headers=headers, content=reply.content, request=self.request
        )
