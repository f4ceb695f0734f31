"""Outcomes of answers and outlier ejection: pure rules over node snapshots, no I/O.

A node's `/health` can stay green while every answer fails (an OOM loop, a wedged
engine, bad weights), so the router judges nodes by their answers too. Envoy's
outlier detection is the model:

- every finished request has an `Outcome`: 2xx is a success, 5xx / unreachable /
  timed out / cut mid-stream is a failure of the node, anything else (4xx, 429, a
  caller who closed early before any answer) is neutral;
- `streak` consecutive failures, or an error rate over the last `window` answers,
  eject a healthy node for `base_ejection_time` x times ejected (capped);
- when that time is up the node is re-admitted on probation: its first success
  clears its record, its first failure ejects it again at once;
- at most `max_ejection_percent` of the nodes are ejected at a time, and when no
  healthy node is left the ejected ones are routed anyway (panic mode): a fleet
  whose every node fails keeps answering rather than refuse everything.

The registry applies these rules under its lock; it logs what they decide.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import Enum

from lmfleet.config import OutlierOptions
from lmfleet.node.state import NodeState, NodeStatus


class Outcome(str, Enum):
    """How one request ended, from the node's point of view."""

    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


def outcome_of_status(status: int) -> Outcome:
    """2xx success; 5xx the node's failure; 4xx (429 busy included) the caller's: neutral."""
    if 200 <= status < 300:
        return Outcome.SUCCESS
    if status >= 500:
        return Outcome.FAILURE
    return Outcome.NEUTRAL


def judge(
    state: NodeState, outcome: Outcome, failed_recently: int, recent: int, options: OutlierOptions
) -> tuple[NodeState, str | None]:
    """`state` after `outcome`, and the reason to eject it now (None: keep it).

    `failed_recently` of the node's `recent` last answers failed, this one included.
    """
    if outcome is Outcome.NEUTRAL:
        return state, None
    failed = outcome is Outcome.FAILURE
    rate = failed_recently / recent if recent else 0.0
    if not failed:
        if state.probation:
            state = state.evolve(probation=False, ejections=0)
        if state.streak == 0 and state.error_rate == rate and state.recent_answers == recent:
            return state, None  # the common success: nothing to record
        return state.evolve(streak=0, error_rate=rate, recent_answers=recent), None
    state = state.evolve(streak=state.streak + 1, error_rate=rate, recent_answers=recent)
    if not options.enabled or state.status is not NodeStatus.HEALTHY:
        return state, None
    if state.probation:
        return state, "failed again on probation"
    if state.streak >= options.consecutive_failures:
        return state, f"{state.streak} failures in a row"
    if recent >= options.min_requests and rate >= options.error_rate:
        return state, f"error rate {rate:.0%} over the last {recent} answers"
    return state, None


def may_eject(nodes: Iterable[NodeState], options: OutlierOptions) -> bool:
    """True when one more ejection stays within `max_ejection_percent` of the routable pool."""
    pool = ejected = 0
    for node in nodes:
        if node.status is NodeStatus.EJECTED:
            ejected += 1
            pool += 1
        elif node.status is NodeStatus.HEALTHY:
            pool += 1
    return ejected + 1 <= math.floor(pool * options.max_ejection_percent / 100 + 1e-9)


def eject(state: NodeState, reason: str, now: float, options: OutlierOptions) -> NodeState:
    """Out of routing for base x times ejected, capped; the reason becomes its message."""
    times = state.ejections + 1
    seconds = min(options.base_ejection_time * times, options.max_ejection_time)
    return state.evolve(
        status=NodeStatus.EJECTED,
        ejections=times,
        ejected_until=now + seconds,
        probation=False,
        message=f"ejected for {seconds:g} s: {reason}",
    )


def readmit(state: NodeState) -> NodeState:
    """Back in routing on probation: the next answer decides."""
    return state.evolve(
        status=NodeStatus.HEALTHY,
        probation=True,
        streak=0,
        message=f"re-admitted on probation after ejection #{state.ejections}",
    )
