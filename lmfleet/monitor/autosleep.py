"""Idle auto-sleep: a node that has served nothing for `auto_sleep_after` seconds is
put to sleep, so an idle fleet gives its GPU memory back without anyone asking.

A node is idle when it is healthy, has no request in flight, is not held by an
admin command, and saw no lease, release or return to health for that long (the
registry records those instants: a node just started or just woken is not idle).
It goes to sleep by the path `fleet.sleep()` takes (drain, then `POST /sleep`),
so a request leased in the instant between the check and the sleep still ends
normally. Wake on demand brings a node back when a request finds none awake
(`FleetAdmin.starved`); auto-sleep turns it on.
"""

from __future__ import annotations

import logging
import time

import anyio
from anyio.abc import TaskStatus

from lmfleet.errors import NodeCommandError, UnknownNodeError
from lmfleet.node.admin import FleetAdmin
from lmfleet.node.state import NodeStatus
from lmfleet.registry import NodeRegistry

log = logging.getLogger("lmfleet")

MAX_CHECK_INTERVAL = 1.0
"""Seconds between idleness checks at most: a node sleeps at most this late."""

MIN_CHECK_INTERVAL = 0.05
"""Seconds between checks at least, however short `auto_sleep_after` is."""


def check_interval(after: float) -> float:
    """How often to look for idle nodes: a quarter of `after`, within the bounds above."""
    return min(max(after / 4, MIN_CHECK_INTERVAL), MAX_CHECK_INTERVAL)


def idle_nodes(registry: NodeRegistry, after: float, now: float) -> list[tuple[str, float]]:
    """(URL, seconds idle) of every node idle for at least `after` seconds at `now`."""
    due = []
    for state in registry.snapshot():
        if state.status is not NodeStatus.HEALTHY or state.inflight:
            continue
        if registry.is_held(state.url):
            continue
        last = registry.last_active(state.url)
        if last is not None and now - last >= after:
            due.append((state.url, now - last))
    return due


class AutoSleep:
    """The fleet's auto-sleep task: `run` checks every `check_interval(after)` seconds."""

    def __init__(
        self, registry: NodeRegistry, admin: FleetAdmin, *, after: float, level: int
    ) -> None:
        self._registry = registry
        self._admin = admin
        self.after = after
        self.level = level

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Check for idle nodes until cancelled (the fleet's task group ends it)."""
        task_status.started()
        interval = check_interval(self.after)
        while True:
            await anyio.sleep(interval)
            await self.check()

    async def check(self) -> list[str]:
        """Put every node idle for `after` seconds to sleep, all at once; their URLs."""
        due = idle_nodes(self._registry, self.after, time.monotonic())
        async with anyio.create_task_group() as tg:
            for url, idle in due:
                tg.start_soon(self._sleep, url, idle)
        return [url for url, _ in due]

    async def _sleep(self, url: str, idle: float) -> None:
        log.info(
            "node %s idle for %.1f s: putting it to sleep (level %d, auto_sleep_after=%g s)",
            url,
            idle,
            self.level,
            self.after,
            extra={"node": url},
        )
        try:
            await self._admin.sleep(self.level, [url])
        except (NodeCommandError, UnknownNodeError) as exc:
            # It stays awake; the failed attempt counts as activity, so it is tried
            # again only after another `after` seconds, not at every check.
            log.warning("node %s: auto-sleep failed: %s", url, exc, extra={"node": url})
