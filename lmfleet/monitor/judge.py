"""The verdict on what a node's `/health` said: pure, no I/O, no clock.

`health_answer` reads LMDeploy's answer into a `Probe` (`status_answer` an engine's
whose `/health` is a bare status code); `judge` decides the status
the node should have next from its snapshot and that probe. The monitor's loop
(`monitor/loop.py`) does the asking and writes the verdict into the registry,
after confirming what `/health` may report late (`/is_sleeping`).
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass

from lmfleet.node.state import NodeState, NodeStatus

FINAL = (NodeStatus.DRAINING, NodeStatus.STOPPED)
"""States only an admin command leaves: a probe never changes them."""

ANSWERED = (NodeStatus.HEALTHY, NodeStatus.EJECTED)
"""States /health cannot tell apart: the node is up; its answers say whether to route."""


@dataclass(frozen=True, slots=True)
class Probe:
    """What one health round said: `status` is LMDeploy's word ("healthy",
    "sleeping", "unhealthy", "initializing"), "up" (answering, asleep or not: an
    engine that cannot say), or "unreachable"."""

    status: str
    message: str

    @property
    def ok(self) -> bool:
        return self.status in ("healthy", "sleeping", "up")


def unreachable(error: Exception) -> Probe:
    return Probe("unreachable", f"unreachable: {error}")


def health_answer(status: int, raw: bytes) -> Probe:
    """What a `/health` answer says, in LMDeploy's words.

    A node says the same few things round after round: short answers are
    remembered, so the monitor decodes each once."""
    if len(raw) <= 512:
        return _remembered_answer(status, raw)
    return _health_answer(status, raw)


@functools.lru_cache(maxsize=256)
def _remembered_answer(status: int, raw: bytes) -> Probe:
    return _health_answer(status, raw)


def _health_answer(status: int, raw: bytes) -> Probe:
    word, message = "", ""
    with contextlib.suppress(ValueError):
        body = json.loads(raw)
        if isinstance(body, dict):
            word = str(body.get("status", "")).lower()
            message = str(body.get("message", ""))
    if status == 200:
        word = word if word in ("sleeping", "unhealthy", "initializing") else "healthy"
    elif word not in ("unhealthy", "initializing"):
        word = "unhealthy"
    return Probe(word, message or f"HTTP {status} {word}")


def status_answer(status: int, raw: bytes) -> Probe:
    """A health route that says only its status code (SGLang's `/health`, a generic
    server's `/v1/models`): 200 is "up", whether asleep it cannot say."""
    return Probe("up", "HTTP 200") if status == 200 else Probe("unhealthy", f"HTTP {status}")


def judge(state: NodeState, probe: Probe, unhealthy_after: int) -> NodeStatus:
    """The status a node should have after `probe`, before any confirmation.

        A node that has never been healthy stays `starting` while it says
        "initializing" or, when it is known to be coming up (launched here or registered
    itself), while it does not answer yet;
        an attached node that cannot be reached becomes `unhealthy` (and says why).
    """
    if state.status in FINAL:
        return state.status
    if probe.status == "healthy":
        # An ejected node's /health was green all along: its answers decide (ejection.py).
        return NodeStatus.EJECTED if state.status is NodeStatus.EJECTED else NodeStatus.HEALTHY
    if probe.status == "sleeping":
        return NodeStatus.SLEEPING
    if probe.status == "up":
        # Up, asleep or not: what the fleet last did to it stands.
        if state.status in (NodeStatus.SLEEPING, NodeStatus.EJECTED):
            return state.status
        return NodeStatus.HEALTHY
    if state.status is NodeStatus.STARTING and (state.announced or probe.status == "initializing"):
        return NodeStatus.STARTING
    if state.failures + 1 >= unhealthy_after or state.status is NodeStatus.UNHEALTHY:
        return NodeStatus.UNHEALTHY
    return state.status
