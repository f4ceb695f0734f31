"""A consistent-hash ring with virtual nodes over every URL seen.

The ring holds every URL ever offered, not only the eligible ones: a pick walks
clockwise from the key's point and skips URLs that are not eligible *this* time.
That is consistent hashing's own rule for a missing node, so the per-model
subsets and the failover subsets (`avoid`) all share one ring and never rebuild
it; a key whose node is excluded lands on the same next node every time.

Points come from BLAKE2b, not `hash()`, so they are the same in every process:
two clients (or proxy workers) send the same prefix to the same node.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from hashlib import blake2b


def stable_hash(text: str) -> int:
    """64-bit hash of `text`, identical across processes and Python versions."""
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """Sorted points (`vnodes` per URL) and the URL that owns each point."""

    __slots__ = ("_owners", "_points", "urls", "vnodes")

    def __init__(self, vnodes: int) -> None:
        self.vnodes = vnodes
        self.urls: frozenset[str] = frozenset()
        self._points: list[int] = []
        self._owners: list[str] = []

    def rebuild(self, urls: Iterable[str]) -> None:
        """Place exactly `urls`; a URL keeps the same points whenever it is placed."""
        placed = sorted(
            (stable_hash(f"{url}#{i}"), url) for url in set(urls) for i in range(self.vnodes)
        )
        self.urls = frozenset(url for _, url in placed)
        self._points = [point for point, _ in placed]
        self._owners = [url for _, url in placed]

    def walk(self, key: str) -> Iterable[str]:
        """Owners clockwise from `key`'s point, one full turn (repeats included)."""
        owners = self._owners
        count = len(owners)
        start = bisect_right(self._points, stable_hash(key))
        for step in range(count):
            yield owners[(start + step) % count]
