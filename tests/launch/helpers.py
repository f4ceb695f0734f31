"""Helpers for launcher tests: real processes, found and checked with psutil."""

from __future__ import annotations

from collections.abc import Iterable

import psutil
from support import wait_until

FAST = ("--health-poll-interval", "0.5", "--ttft-ms", "5", "--tpot-ms", "2")


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as dead)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def all_dead(pids: Iterable[int], timeout: float = 10.0) -> bool:
    pids = list(pids)
    try:
        wait_until(lambda: not any(alive(p) for p in pids), timeout=timeout)
    except AssertionError:
        return False
    return True
