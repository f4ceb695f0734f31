"""`DistServe`: one fleet's prefill/decode serving mode.

It decides, per request, whether to run prefill -> decode (a `DistServePlan`,
exchange.py) or a Hybrid plan, keeps one strategy per phase, and offers the
fleet-wide operations: warm every pair up and collect caches stranded by dead
decode nodes (`/distserve/gc`, a TODO in LMDeploy). The pairs themselves and the
control calls that connect, free and drop them are `PairLinks` (links.py).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import httpx2

from lmfleet.config import DistServeOptions
from lmfleet.errors import MigrationError
from lmfleet.node.state import NodeRole, NodeStatus
from lmfleet.routing import STRATEGIES, resolve_strategy
from lmfleet.routing.base import Strategy, as_base_strategy
from lmfleet.transport.distserve import protocol as pd
from lmfleet.transport.distserve.exchange import DistServePlan, rejected_n
from lmfleet.transport.distserve.links import PairLinks
from lmfleet.transport.distserve.pairs import Pair
from lmfleet.transport.plan import RequestPlan
from lmfleet.transport.request import json_body
from lmfleet.transport.router import Router
from lmfleet.transport.steps import Steps

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
        self.links = PairLinks(router.routing, options)
        """The pair connections and the control calls that change them."""
        self.pool = self.links.pool
        # One copy of the strategy per phase: a shared tie rotation (round robin,
        # least-connections ties) would see prefill and decode picks interleaved
        # and could send every request of a role to the same node.
        self.strategies = {
            NodeRole.PREFILL: _own_copy(router.strategy),
            NodeRole.DECODE: _own_copy(router.strategy),
        }
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
        return DistServePlan(self.links, self.strategies, base, body, path)

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

    # -- fleet-wide ---------------------------------------------------------------

    def routable_pairs(self) -> list[Pair]:
        nodes = [n for n in self.router.registry.snapshot() if n.routable]
        prefill = [n.url for n in nodes if n.role is NodeRole.PREFILL]
        decode = [n.url for n in nodes if n.role is NodeRole.DECODE]
        return [(p, d) for p in prefill for d in decode]

    def warmup(self, pair: Pair) -> Steps[bool]:
        """Connect one pair ahead of traffic (`/distserve/connection_warmup`)."""
        try:
            yield from self.links.connect(pair)
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
            freed += yield from self.links.drop(pair)
            dropped.append(list(pair))
        return {"freed": freed, "dropped": dropped}
