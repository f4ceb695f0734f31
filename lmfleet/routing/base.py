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
    """

    model: str | None = None
    affinity_key: str | None = None
    role: NodeRole | None = None


@runtime_checkable
class Strategy(Protocol):
    """Pick one node among `nodes` (never empty) for `request`.

    Returning None means "none of these is acceptable right now" and makes the
    router wait as if no node were eligible.
    """

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None: ...


def wants_affinity_key(strategy: object) -> bool:
    """True when `strategy` declares `uses_affinity_key = True`.

    The router reads request bodies only for such strategies, so the flag is an
    opt-in class attribute rather than part of the one-method contract.
    """
    return getattr(strategy, "uses_affinity_key", False) is True
