"""`DistServe`: one fleet's prefill/decode orchestration state and control calls.

It owns the `PairPool` and knows how to connect a pair (LMDeploy's
`PDConnectionPool.connect`: engine_info on both, p2p_initialize on both,
p2p_connect on both), free a prefill cache, drop a pair, warm every pair up and
collect caches stranded by dead decode nodes (`/distserve/gc`, a TODO in
LMDeploy). Every control call is a `Call` step with `control_timeout`, so the
same code runs under the sync and async drivers.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import httpx2

from lmfleet.config import DistServeOptions
from lmfleet.errors import MigrationError, UnknownNodeError
from lmfleet.node.client import Node, NodeAddress, call_failed
from lmfleet.node.state import NodeRole, NodeStatus
from lmfleet.routing import STRATEGIES, resolve_strategy
from lmfleet.routing.base import Strategy, as_base_strategy
from lmfleet.transport.distserve import protocol as pd
from lmfleet.transport.distserve.exchange import DistServePlan, rejected_n
from lmfleet.transport.distserve.pairs import Pair, PairPool
from lmfleet.transport.plan import RequestPlan
from lmfleet.transport.request import json_body
from lmfleet.transport.router import Router
from lmfleet.transport.steps import Call, Steps, WaitFor

log = logging.getLogger("lmfleet.distserve")


def _own_copy(strategy: Strategy) -> Strategy:
    """A strategy of the same kind with its own state; a built-in one gets a fresh RNG
    (a deep copy would replay the same random draws for prefill and decode)."""
    name = as_base_strategy(strategy).name
    if name in STRATEGIES:
        return resolve_strategy(name)
    return copy.deepcopy(strategy)


class DistServe:
    """Prefill/decode disaggregation for one fleet's router (`router.distserve`)."""

    def __init__(self, router: Router, options: DistServeOptions) -> None:
        self.router = router
        self.routing = router.routing
        """What the plans route with (the router's)."""
        self.options = options
        self.pool = PairPool()
        # One copy of the strategy per phase: a shared tie rotation (round robin,
        # least-connections ties) would see prefill and decode picks interleaved
        # and could send every request of a role to the same node.
        self.strategies = {
            NodeRole.PREFILL: _own_copy(router.strategy),
            NodeRole.DECODE: _own_copy(router.strategy),
        }
        self.protocol = pd.MIGRATION_PROTOCOL[options.migration_protocol]
        self.rdma = pd.rdma_config(options.link_type, options.with_gdr)
        self.dummy_prefill = options.dummy_prefill
        """LMDeploy's `--dummy-prefill`: decode nodes only, no prefill, no pair."""

    # -- routing ------------------------------------------------------------------

    def route(self, request: httpx2.Request) -> RequestPlan | DistServePlan:
        """The DistServe serving mode (`Planner`): a `DistServePlan` for a
        chat/completions POST when the fleet has both roles for its model, else a
        Hybrid `RequestPlan` (see docs/distserve.md)."""
        router = self.router
        path = request.url.path
        if request.method != "POST" or path not in pd.DISAGGREGATED_PATHS:
            return router.plan(request)  # any node: these routes have no P/D split
        body = json_body(request)
        if body is None:
            return router.plan(request, role=NodeRole.HYBRID)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        role = self._serving_role(model)
        if role is NodeRole.HYBRID:
            return router.plan(request, role=NodeRole.HYBRID)
        base: RequestPlan = router.plan(request, role=NodeRole.PREFILL)
        if base.immediate is not None:
            return base
        n = body.get("n")
        if isinstance(n, int) and n > 1:
            base.immediate = rejected_n(request)
            return base
        return DistServePlan(self, base, body, path)

    def _serving_role(self, model: str | None) -> NodeRole:
        """PREFILL (run P->D) when routable prefill and decode nodes serve `model`;
        HYBRID when Hybrid nodes serve it; P->D (waiting for them) otherwise.

        With `dummy_prefill` no prefill node is called, so routable decode nodes
        are enough for P->D (LMDeploy's proxy asks only for a decode node then).
        """
        needed = {NodeRole.DECODE} if self.dummy_prefill else {NodeRole.PREFILL, NodeRole.DECODE}
        routable: set[NodeRole] = set()
        present: set[NodeRole] = set()
        for node in self.router.registry.snapshot():
            if model is not None and node.models and model not in node.models:
                continue
            present.add(node.role)
            if node.status is NodeStatus.HEALTHY:
                routable.add(node.role)
        if needed <= routable:
            return NodeRole.PREFILL
        if NodeRole.HYBRID in present:
            return NodeRole.HYBRID
        return NodeRole.PREFILL if present else NodeRole.HYBRID

    # -- control calls ------------------------------------------------------------

    def _control(self, method: str, url: str, path: str, body: Any = None) -> Steps[Any]:
        """One `/distserve/*` call with `control_timeout`; its JSON, or MigrationError."""
        try:
            node: Node = self.router.registry.get(url)
        except UnknownNodeError:
            node = NodeAddress(url)
        request = self.router.nodes.request(
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

    # -- fleet-wide ---------------------------------------------------------------

    def routable_pairs(self) -> list[Pair]:
        nodes = [n for n in self.router.registry.snapshot() if n.routable]
        prefill = [n.url for n in nodes if n.role is NodeRole.PREFILL]
        decode = [n.url for n in nodes if n.role is NodeRole.DECODE]
        return [(p, d) for p in prefill for d in decode]

    def warmup(self, pair: Pair) -> Steps[bool]:
        """Connect one pair ahead of traffic (`/distserve/connection_warmup`)."""
        try:
            yield from self.connect(pair)
        except MigrationError as exc:
            log.warning("distserve warmup: %s", exc)
            return False
        return True

    def gc(self) -> Steps[dict[str, Any]]:
        """Free caches stranded on pairs whose decode node is no longer routable, and
        drop those pairs (what LMDeploy's `/distserve/gc` leaves as a TODO)."""
        registry = self.router.registry
        alive = {n.url for n in registry.snapshot() if n.routable}
        dropped: list[list[str]] = []
        freed = 0
        for pair in self.pool.pairs():
            if pair[1] in alive and pair[0] in alive:
                continue
            freed += yield from self.drop(pair)
            dropped.append(list(pair))
        return {"freed": freed, "dropped": dropped}
