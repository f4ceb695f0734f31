"""`PairLinks`: the control calls that connect, free and drop prefill/decode pairs.

LMDeploy's `PDConnectionPool.connect` is six calls: `engine_info` on both nodes,
`p2p_initialize` on both, `p2p_connect` on both; a pair is connected once and
shared by every request over it (`PairPool`). A prefill cache the decode node
never took is freed on the prefill node; a pair that failed is dropped on both
sides. Every call is a `Call` step built by the node client with `control_timeout`,
so the same code runs under the sync and the async driver.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx2

from lmfleet.config import DistServeOptions
from lmfleet.errors import MigrationError, UnknownNodeError
from lmfleet.node.client import Node, NodeAddress, call_failed
from lmfleet.transport.distserve import protocol as pd
from lmfleet.transport.distserve.pairs import Pair, PairPool
from lmfleet.transport.plan import Routing
from lmfleet.transport.steps import Call, Steps, WaitFor

log = logging.getLogger("lmfleet.distserve")


class PairLinks:
    """One fleet's prefill/decode connections: the pool and the calls that change it."""

    def __init__(self, routing: Routing, options: DistServeOptions) -> None:
        self.routing = routing
        self.options = options
        self.pool = PairPool()
        self.protocol = pd.MIGRATION_PROTOCOL[options.migration_protocol]
        """LMDeploy's migration protocol number, sent in the decode request."""
        self.rdma = pd.rdma_config(options.link_type, options.with_gdr)

    def _control(self, method: str, url: str, path: str, body: Any = None) -> Steps[Any]:
        """One `/distserve/*` call with `control_timeout`; its JSON, or MigrationError."""
        try:
            node: Node = self.routing.registry.get(url)
        except UnknownNodeError:
            node = NodeAddress(url)
        request = self.routing.nodes.request(
            node, method, path, json=body, timeout=self.options.control_timeout
        )
        reply = yield Call(request)
        failed = call_failed(url, request, reply)
        if failed is not None:
            raise MigrationError(str(failed)) from failed
        assert isinstance(reply, httpx2.Response)
        try:
            return reply.json()
        except ValueError as exc:
            raise MigrationError(f"{method} {url}{path} answered no JSON: {exc}") from exc

    def _best_effort(self, url: str, path: str, body: dict[str, Any]) -> Steps[bool]:
        """A cleanup call whose failure (the node may be dead) is only logged."""
        try:
            yield from self._control("POST", url, path, body)
        except MigrationError as exc:
            log.info("distserve cleanup: %s", exc)
            return False
        return True

    def connect(self, pair: Pair) -> Steps[None]:
        """Make sure `pair` is connected: connect it (once) or wait for whoever does."""
        state, owner = self.pool.claim(pair)
        if not owner:
            if not state.done.is_set():
                yield WaitFor(state.done, self._wait_budget())
            if state.connected:
                return
            raise MigrationError(
                f"pair {pair} did not connect: {state.error or 'timed out waiting for it'}"
            )
        try:
            yield from self._connect(pair)
        except MigrationError as exc:
            self.pool.settle(pair, state, str(exc))
            raise
        except BaseException:
            self.pool.settle(pair, state, "the connecting request was cancelled")
            raise
        self.pool.settle(pair, state)

    def _wait_budget(self) -> float:
        # The owner makes six control calls, each bounded by control_timeout.
        return 6 * self.options.control_timeout + 1.0

    def _connect(self, pair: Pair) -> Steps[None]:
        p_url, d_url = pair
        try:
            p_cfg = pd.engine_config((yield from self._control("GET", p_url, pd.ENGINE_INFO)))
            d_cfg = pd.engine_config((yield from self._control("GET", d_url, pd.ENGINE_INFO)))
        except ValueError as exc:
            raise MigrationError(str(exc)) from exc
        if p_cfg.get("tp_size") != d_cfg.get("tp_size"):
            # LMDeploy asserts this too: only equal parallel configurations connect.
            raise MigrationError(
                f"pair {pair}: tp_size differs ({p_cfg.get('tp_size')} vs {d_cfg.get('tp_size')})"
            )
        p_req = pd.init_request(self.protocol, (p_url, p_cfg), (d_url, d_cfg), self.rdma)
        d_req = pd.init_request(self.protocol, (d_url, d_cfg), (p_url, p_cfg), self.rdma)
        try:
            p_init = pd.check_status(
                (yield from self._control("POST", p_url, pd.P2P_INITIALIZE, p_req)),
                "p2p_initialize",
            )
            d_init = pd.check_status(
                (yield from self._control("POST", d_url, pd.P2P_INITIALIZE, d_req)),
                "p2p_initialize",
            )
            p_conn = pd.connect_request(self.protocol, d_url, d_init)
            d_conn = pd.connect_request(self.protocol, p_url, p_init)
            pd.check_status(
                (yield from self._control("POST", p_url, pd.P2P_CONNECT, p_conn)), "p2p_connect"
            )
            pd.check_status(
                (yield from self._control("POST", d_url, pd.P2P_CONNECT, d_conn)), "p2p_connect"
            )
        except ValueError as exc:
            raise MigrationError(str(exc)) from exc

    def free(self, prefill_url: str, session_id: int) -> Steps[bool]:
        """Free one preserved prefill cache (`/distserve/free_cache` on the prefill node)."""
        body = pd.free_cache_request(prefill_url, session_id)
        return (yield from self._best_effort(prefill_url, pd.FREE_CACHE, body))

    def drop(self, pair: Pair, also_free: int | None = None) -> Steps[int]:
        """LMDeploy's `PDConnectionPool.drop`: free every cache shelved on the pair
        (and `also_free`), then drop the connection on both sides. Returns caches freed."""
        p_url, d_url = pair
        sessions = self.pool.drop(pair)
        if also_free is not None:
            sessions.add(also_free)
        freed = 0
        for session_id in sorted(sessions):
            freed += bool((yield from self.free(p_url, session_id)))
        yield from self._best_effort(p_url, pd.P2P_DROP_CONNECT, pd.drop_request(p_url, d_url))
        yield from self._best_effort(d_url, pd.P2P_DROP_CONNECT, pd.drop_request(d_url, p_url))
        return freed
