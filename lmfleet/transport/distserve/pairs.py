"""Which (prefill, decode) pairs are connected, and which KV caches await migration.

One `PairPool` per fleet, shared by every transport (callers' threads, callers'
event loops, the proxy's loop). Hence a `threading.Lock` and `threading.Event`s,
not an event loop's primitives: a pair's connection is established once, by the
first request that needs it (the *owner*), and every concurrent first request
waits on that pair's event instead of connecting again. A failed attempt is
forgotten, so the next request tries afresh.

The shelf is LMDeploy's `migration_session_shelf`: prefill sessions whose cache
a decode node has not taken yet. If the decode side dies, the shelved sessions
are what to free on the prefill node (`/distserve/gc`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

Pair = tuple[str, str]
"""(prefill url, decode url)."""


@dataclass(eq=False)
class PairState:
    """One pair's connection: `done` is set once the owner finished, well or not."""

    done: threading.Event = field(default_factory=threading.Event)
    connected: bool = False
    error: str = ""


class PairPool:
    """Connection states and shelved sessions per pair, behind one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pairs: dict[Pair, PairState] = {}
        self._shelf: dict[Pair, set[int]] = {}
        self.connects = 0
        """Pairs connected so far (a reconnect after a drop counts again)."""

    def claim(self, pair: Pair) -> tuple[PairState, bool]:
        """The pair's state, and True when the caller must connect it (it is the owner)."""
        with self._lock:
            state = self._pairs.get(pair)
            if state is not None:
                return state, False
            state = self._pairs[pair] = PairState()
            return state, True

    def settle(self, pair: Pair, state: PairState, error: str = "") -> None:
        """The owner is done: connected, or failed with `error` (then forgotten)."""
        with self._lock:
            state.connected = not error
            state.error = error
            if error:
                if self._pairs.get(pair) is state:
                    del self._pairs[pair]
            else:
                self.connects += 1
        state.done.set()

    def drop(self, pair: Pair) -> set[int]:
        """Forget the pair; return the sessions still shelved on it (to free)."""
        with self._lock:
            self._pairs.pop(pair, None)
            return self._shelf.pop(pair, set())

    def shelve(self, pair: Pair, session_id: int) -> None:
        with self._lock:
            self._shelf.setdefault(pair, set()).add(session_id)

    def unshelve(self, pair: Pair, session_id: int) -> None:
        with self._lock:
            sessions = self._shelf.get(pair)
            if sessions is not None:
                sessions.discard(session_id)
                if not sessions:
                    del self._shelf[pair]

    def pairs(self) -> list[Pair]:
        """Every pair known (connected or connecting) or holding shelved sessions."""
        with self._lock:
            return sorted(set(self._pairs) | set(self._shelf))

    def shelved(self) -> dict[Pair, set[int]]:
        with self._lock:
            return {pair: set(s) for pair, s in self._shelf.items()}
