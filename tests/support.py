"""Helpers shared by tests (importable: `tests/` is on pytest's pythonpath)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

from lmfleet.launch.process import ManagedProcess


@dataclass
class SimNode:
    """A running `lmfleet sim` process."""

    url: str
    port: int
    process: ManagedProcess


StartSim = Callable[..., SimNode]


def chat(client: openai.OpenAI, model: str, text: str, **params: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **params
    )


def sim_stats(url: str, api_key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx2.get(url + "/sim/stats", headers=headers, timeout=5)
    response.raise_for_status()
    stats: dict[str, Any] = response.json()
    return stats


def sim_served(url: str) -> int:
    """Completed inference requests on one simulated node (from its own counters)."""
    return int(sim_stats(url)["completed"])


def wait_until(
    predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition"
) -> None:
    """Poll `predicate` (observable state: stats, status, logs) until true, or fail."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:g} s")
        time.sleep(0.02)
