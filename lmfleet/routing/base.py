"""The one contract every routing strategy implements.

A strategy is a small chooser over immutable snapshots that the registry has
already filtered (healthy, serving the model, not excluded by failover). It does
no I/O and holds no lock; randomness and time are injected so tests are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from lmfleet.state import NodeRole, NodeState


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a strategy may know about the request being routed.

    `affinity_key` is only computed for strategies that set
    `uses_affinity_key = True` (reading the body costs time on the hot path).
    `role` limits the candidates to nodes of that role (DistServe's prefill and
    decode phases); None, the Hybrid default, means any role.
    `weight_version` asks for nodes of exactly that weight version (a batch that
    must not mix versions), `min_weight_version` for at least that one.
    """

    model: str | None = None
    affinity_key: str | None = None
    role: NodeRole | None = None
    weight_version: int | None = None
    min_weight_version: int | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """One eligible node as a strategy saw it: its `score` (lower wins, in the
    strategy's own unit) and the reason in words."""

    url: str
    score: float | None
    why: str


@dataclass(frozen=True, slots=True)
class Decision:
    """Which node a strategy would pick now, among which candidates, and why."""

    strategy: str
    chosen: str | None
    candidates: tuple[Candidate, ...]
    note: str = ""


@runtime_checkable
class Strategy(Protocol):
    """Pick one node among `nodes` (never empty) for `request`.

    Returning None means "none of these is acceptable right now" and makes the
    router wait as if no node were eligible.
    """

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None: ...


def explain_pick(
    strategy: Strategy, nodes: Sequence[NodeState], request: RequestInfo, note: str = ""
) -> Decision:
    """What `strategy` would pick among `nodes`, with each candidate's score when the
    strategy can say (an `explain(nodes, request)` method), else the in-flight counts.

    The pick is real: a rotating strategy's cursor moves, as it would for a request.
    """
    name = str(getattr(strategy, "name", type(strategy).__name__))
    chosen = strategy.pick(nodes, request) if nodes else None
    explain = getattr(strategy, "explain", None)
    if callable(explain) and nodes:
        candidates = tuple(explain(nodes, request))
    else:
        candidates = tuple(
            Candidate(n.url, None, f"{n.inflight} of our requests in flight") for n in nodes
        )
    return Decision(name, chosen.url if chosen is not None else None, candidates, note)


def uses_node_load(strategy: object) -> bool:
    """True when `strategy` declares `uses_node_load = True` (it reads `NodeState.load`,
    so the monitor should read the nodes' `/metrics` every round)."""
    return getattr(strategy, "uses_node_load", False) is True


def wants_affinity_key(strategy: object) -> bool:
    """True when `strategy` declares `uses_affinity_key = True`.

    The router reads request bodies only for such strategies, so the flag is an
    opt-in class attribute rather than part of the one-method contract.
    """
    return getattr(strategy, "uses_affinity_key", False) is True
