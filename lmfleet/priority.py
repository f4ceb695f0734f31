"""Request priority: who goes first when requests wait, and who waits at all.

A request may carry a priority: an integer, higher goes first, default 0
(`x-lmfleet-priority: -1`, `extra_body={"lmfleet_priority": -1}`,
`chat_many(..., priority=-1)`, or a proxy key's default). It matters only where
requests wait:

- **for a node** (the admission queue: no node eligible yet, one waking, or a
  request held back as below): a waiting request lets any waiting request of a
  higher *effective* priority for the same model go first;
- **for a full node**: a request of negative priority (*background*, a batch job)
  is not sent to a node whose batch is full (its requests, every client's, reach
  the capacity its own `/metrics` showed when it last had a queue): it waits in the
  fleet instead of in the node's queue, so that requests of priority 0 and up meet
  a short queue in the node;
- **for an upstream connection** (the proxy's `--max-connections`).

Aging: a waiting request gains one level per `AGING_SECONDS` of waiting, so a low
priority is never starved forever (a background request that waited that long per
level below 0 is no longer held back). Since every waiter ages at the same rate,
the order between two waiters never changes while they wait: `rank` orders them
once, by the time their effective priorities pass 0.
"""

from __future__ import annotations

PRIORITY_HEADER = "x-lmfleet-priority"
"""On a request: its priority (an integer; higher goes first; default 0)."""

PRIORITY_FIELD = "lmfleet_priority"
"""The same as a body field (openai's `extra_body`; LMDeploy ignores fields it does
not know). Not `priority`: vLLM reads that one, with the opposite order."""

PRIORITY = "lmfleet.priority"
"""The request extension holding its priority for the transports (the upstream pool)."""

AGING_SECONDS = 10.0
"""Seconds of waiting that raise a request's effective priority by one level."""


def parse_priority(raw: object, where: str) -> int:
    """A request priority from a header (bytes or str) or a body field; ValueError
    naming `where` for anything but an integer."""
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ValueError(f"{where} must be an integer priority (higher goes first), got {raw!r}")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"{where} must be an integer priority (higher goes first), got {raw!r}"
        ) from None


def rank(priority: int, since: float) -> float:
    """Where a request waiting since `since` (`time.monotonic()`) stands in line:
    lower goes first. Equal priorities go in arrival order; each level is worth
    `AGING_SECONDS` of waiting."""
    return since / AGING_SECONDS - priority


def effective(priority: int, since: float, now: float) -> float:
    """The priority of a request waiting since `since`, aged to `now`."""
    return priority + max(0.0, now - since) / AGING_SECONDS
