"""A deadline that moves with every request, checked by one timer.

A connection's read timeout and its idle timeout move on with each request (each
read, each answer). A timer made and cancelled for every move was 3 % of a proxied
chat request's CPU (two per request: the upstream read deadline, the caller's idle
timeout); here a move is a float stored, and the one timer set, when it falls due,
finds the deadline moved on and sets itself for the new one, finds none (disarmed
meanwhile) and ends, or calls `expired`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """`expired` is called once `when` (loop time) has passed, unless disarmed first."""

    __slots__ = ("_at", "_expired", "_handle", "_loop", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, expired: Callable[[], None]) -> None:
        self._loop = loop
        self._expired = expired
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0
        """When the timer set falls due."""
        self.when: float | None = None
        """The deadline; None while disarmed."""

    def arm(self, seconds: float) -> None:
        """The deadline `seconds` from now: the timer set is kept when it falls due no
        later than that (it sets itself again then), else set anew."""
        self.when = when = self._loop.time() + seconds
        if self._handle is None or when < self._at:
            if self._handle is not None:
                self._handle.cancel()
            self._set(when)

    def disarm(self) -> None:
        """No deadline until the next `arm` (a timer still set finds nothing to do)."""
        self.when = None

    def stop(self) -> None:
        """No deadline, and no timer: its owner is gone."""
        self.when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _set(self, at: float) -> None:
        self._at = at
        self._handle = self._loop.call_at(at, self._check)

    def _check(self) -> None:
        self._handle = None
        when = self.when
        if when is None:
            return
        if self._loop.time() < when:
            self._set(when)
            return
        self.when = None
        self._expired()
