"""The proxy's exchange sweep: a late body is cut, a long exchange is watched, and
the sweeping task ends with the last open exchange (no task left behind)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from lmfleet.proxy.exchanges import SWEEP_EVERY, WATCH_AFTER, Exchanges

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _never() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_a_body_later_than_its_deadline_is_cut() -> None:
    exchanges = Exchanges()
    started = time.monotonic()
    with exchanges.open(_never, body_timeout=0.3) as exchange:
        await anyio.Event().wait()  # an exchange that never ends by itself
    assert exchange.body_late and not exchange.gone
    assert 0.3 <= time.monotonic() - started < 0.3 + SWEEP_EVERY + 0.5


async def test_a_caller_gone_is_noticed_only_after_the_body_and_watch_after() -> None:
    received: list[float] = []

    async def disconnect() -> dict[str, Any]:
        received.append(time.monotonic())
        return {"type": "http.disconnect"}

    exchanges = Exchanges()
    started = time.monotonic()
    with exchanges.open(disconnect, body_timeout=30) as exchange:
        exchange.body_read()
        await anyio.Event().wait()  # an exchange that never ends by itself
    assert exchange.gone and not exchange.body_late
    assert len(received) == 1 and received[0] - started >= WATCH_AFTER


async def test_a_fast_exchange_is_never_watched_and_the_sweep_ends() -> None:
    calls: list[str] = []

    async def receive() -> dict[str, Any]:
        calls.append("receive")
        return {"type": "http.disconnect"}

    exchanges = Exchanges()
    with exchanges.open(receive, body_timeout=30) as exchange:
        exchange.body_read()
        await anyio.lowlevel.checkpoint()  # a fast exchange: over at once
    sweeper = exchanges._sweeper
    assert sweeper is not None
    with anyio.fail_after(SWEEP_EVERY * 4):
        await sweeper
    assert exchanges._sweeper is None and not calls and not exchange.gone
