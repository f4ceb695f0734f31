"""Strict rotation in URL order, shared by round robin and least-connections ties.

The cursor is the *URL* last chosen, not an index: when a node joins or leaves, the
next pick is still "the first URL after the last one", so a set change neither
skips a node nor gives one two turns in a row. The sorted order is cached and
rebuilt only when the URLs seen differ from the previous call.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from lmfleet.node.state import NodeState


class UrlRotation:
    """Hands out nodes one after another in URL order, wrapping around."""

    __slots__ = ("_last", "_order", "_sorted", "_urls")

    def __init__(self) -> None:
        self._urls: list[str] = []
        self._order: list[int] = []  # positions in `nodes`, in URL order
        self._sorted: list[str] = []  # the URLs, sorted
        self._last = ""  # every URL sorts after "", so the first pick is the smallest

    def next(
        self, nodes: Sequence[NodeState], loads: Sequence[float] | None = None, low: float = 0
    ) -> NodeState:
        """The first node after the last one handed out (with `loads[i] == low` if given)."""
        urls = [node.url for node in nodes]
        if urls != self._urls:
            order = sorted(range(len(urls)), key=urls.__getitem__)
            self._urls, self._order = urls, order
            self._sorted = [urls[i] for i in order]
        count = len(urls)
        start = bisect_right(self._sorted, self._last)
        for step in range(count):
            k = (start + step) % count
            position = self._order[k]
            if loads is None or loads[position] == low:
                self._last = self._sorted[k]
                return nodes[position]
        raise ValueError(f"no node has load {low}")  # callers pass low = min(loads)
