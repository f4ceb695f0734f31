"""Priority tiers: which of the eligible nodes a request may go to when the operator ranked them.

Users put the GPUs they own first and a slower or shared pool behind them
(`attach(priorities=[100, 100, 50])`; Olla's `priority`: higher is preferred). The
strategy still picks the node; this module only narrows its candidates to one tier,
before the pick, by two rules:

1. **Health** (Envoy's priority levels, overprovisioning factor 1.4). A tier's
   health is the share of its nodes that are healthy (of those that serve the
   request and are not stopped or draining; asleep, starting, unhealthy and ejected
   nodes count as missing). The best tier keeps every request while
   1.4 x its health >= 1 (5 of 7 nodes healthy, or better); below that it keeps
   1.4 x health of the requests and the rest goes down to the next tier by the same
   rule, and so on. When even the sum over all tiers is short of 1, the shares are
   scaled to add up to 1 (Envoy's "degraded" normalisation). A random draw against
   the shares picks the tier of each request.
2. **Load**. Within the tier the draw picked, requests stay while it is not
   saturated: a lower tier's healthy node is a candidate only when its expected wait
   (`least_load`'s estimate: the requests on the node, every client's, plus this one,
   times what one request costs there) is below the tier's best one by the
   `spill_margin` factor (`RoutingOptions.spill_margin`, default 2: under half).
   Then the request goes to those lower nodes alone. `spill_margin=inf` turns
   spilling by load off.

Nodes the operator gave no priority have priority 0. With one priority among a
request's nodes (the default) nothing here runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lmfleet.errors import ConfigError
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.priority import parse_priority as parse_request_priority
from lmfleet.routing.least_load import expected_waits

OVERPROVISIONING = 1.4
"""Envoy's overprovisioning factor: a tier with at least 1/1.4 (~71 %) of its nodes
healthy keeps all its traffic."""

OUT_OF_TIERS = frozenset({NodeStatus.STOPPED, NodeStatus.DRAINING})
"""Nodes taken out on purpose: they count in no tier's size (every other state of a
node that serves the request does, healthy or not)."""

DEFAULT_PRIORITY = 0
"""The priority of a node given none."""


@dataclass(frozen=True, slots=True)
class TierChoice:
    """The nodes one request may go to, and why, when its nodes have several tiers."""

    nodes: list[NodeState]
    spilled: str = ""
    """Why the request left the best tier: "health" (the draw sent it down) or "load"
    (the tier it drew is busy); empty when it stayed in the best tier."""
    note: str = ""
    """The tiers as this request saw them, in words (`fleet.explain()`)."""
    better_asleep: bool = False
    """The request left its best tier by health while a node of a better tier than
    the one it goes to sleeps: a fleet that wakes on demand wakes it (a preferred GPU
    put to sleep by idleness must not leave the traffic on a worse tier for good)."""


def parse_priority(value: object, where: str) -> int:
    """A node priority as given (an integer, or a float that is one, as JSON may carry
    it; higher is preferred): the request priority's parse, a `ConfigError` here."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return parse_request_priority(value.strip() if isinstance(value, str) else value, where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def parse_priorities(priorities: Sequence[int] | None, count: int) -> list[int]:
    """One priority per node (`priorities`, or all `DEFAULT_PRIORITY`), checked against `count`."""
    if priorities is None:
        return [DEFAULT_PRIORITY] * count
    if isinstance(priorities, (str, bytes)) or len(priorities) != count:
        raise ConfigError(f"priorities must give one integer per URL ({count})")
    return [parse_priority(p, f"priorities[{i}]") for i, p in enumerate(priorities)]


def health_shares(tiers: Sequence[tuple[int, int]]) -> list[float]:
    """The share of requests each tier takes by Envoy's rule, from (healthy, total) per
    tier, best tier first. They add up to 1 when any node is healthy."""
    shares: list[float] = []
    left = 1.0
    for healthy, total in tiers:
        health = healthy / total if total else 0.0
        share = min(left, OVERPROVISIONING * health)
        shares.append(share)
        left -= share
    whole = sum(shares)
    if 0.0 < whole < 1.0:
        shares = [share / whole for share in shares]
    return shares


def choose_tier(
    candidates: Sequence[NodeState],
    members: Sequence[NodeState],
    *,
    draw: float,
    now: float,
    spill_margin: float,
) -> TierChoice:
    """The candidates one request may go to, by the module's two rules.

    `candidates`: the nodes the request may go to now (healthy, serving it, not
    avoided by its failover); `members`: every node that serves it (those stopped or
    draining, `OUT_OF_TIERS`, count in no tier's size); `draw`: uniform in [0, 1).
    """
    # One pass over each list: this runs for every request of a tiered fleet, under
    # the registry's lock (bench/routing_pick.py --lease --tiers).
    sizes: dict[int, int] = {}
    for node in members:
        if node.status not in OUT_OF_TIERS:
            sizes[node.priority] = sizes.get(node.priority, 0) + 1
    by_tier: dict[int, list[NodeState]] = {}
    for node in candidates:
        by_tier.setdefault(node.priority, []).append(node)
    priorities = sorted(sizes.keys() | by_tier.keys(), reverse=True)
    if len(priorities) < 2:
        return TierChoice(list(candidates))
    for p in priorities:
        sizes.setdefault(p, 0)
        by_tier.setdefault(p, [])
    counts = [(len(by_tier[p]), max(sizes[p], len(by_tier[p]))) for p in priorities]
    shares = health_shares(counts)
    index = _drawn(shares, draw)
    tier = priorities[index]
    seen = "; ".join(
        f"tier {p}: {healthy}/{total} healthy, {share:.0%} of requests"
        for p, (healthy, total), share in zip(priorities, counts, shares, strict=True)
    )
    lower = [n for p in priorities[index + 1 :] for n in by_tier[p]]
    if lower and math.isfinite(spill_margin):
        kept = by_tier[tier]
        waits = [wait for wait, _ in expected_waits([*kept, *lower], now)]
        best = min(waits[: len(kept)])
        spill = [
            n
            for n, wait in zip(lower, waits[len(kept) :], strict=True)
            if wait * spill_margin < best
        ]
        if spill:
            low = min(waits[len(kept) :])
            note = (
                f"spilled by load below tier {tier}: its best expected wait {best:.3g} is over "
                f"{spill_margin:g}x that of {len(spill)} lower node(s) (best {low:.3g}) ({seen})"
            )
            return TierChoice(spill, "load", note)
    if tier != priorities[0]:
        note = f"spilled by health to tier {tier} ({seen})"
        asleep = any(n.status is NodeStatus.SLEEPING and n.priority > tier for n in members)
        return TierChoice(by_tier[tier], "health", note, better_asleep=asleep)
    return TierChoice(by_tier[tier], "", f"tier {tier} ({seen})")


def _drawn(shares: Sequence[float], draw: float) -> int:
    """The tier whose slice of [0, 1) `draw` falls in; the last one with a share for
    a draw past their rounded sum."""
    total = 0.0
    last = 0
    for index, share in enumerate(shares):
        if share <= 0.0:
            continue
        last = index
        total += share
        if draw < total:
            return index
    return last
