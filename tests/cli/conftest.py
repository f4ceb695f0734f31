"""Fixtures for the `lmfleet` console script tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from cli_support import Console


@pytest.fixture
def console() -> Iterator[Callable[..., Console]]:
    """Start `lmfleet` commands; each one still running at the end is killed."""
    started: list[Console] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Console:
        started.append(Console(*args, env=env))
        return started[-1]

    yield start
    for one in started:
        one.kill()
