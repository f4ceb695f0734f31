"""A bounded load generator for the reliability tests and the soak run.

Each request ends as exactly one outcome: "ok", a clear typed error (named by the
openai exception and the lmfleet/httpx2 error under it), or "lost": it hung past
its bound or failed in a way nobody would understand. "lost" must stay at zero.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import openai

from lmfleet.errors import RoutingError

LOST = "lost"

Door = Callable[..., openai.AsyncOpenAI]
"""Opens a client on a fleet: its own routed client, or a plain one via its proxy."""


@dataclass
class Report:
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    @property
    def ok(self) -> int:
        return self.outcomes["ok"]

    @property
    def lost(self) -> int:
        return self.outcomes[LOST]

    @property
    def clear_errors(self) -> int:
        return self.sent - self.ok - self.lost

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[int(0.99 * (len(ordered) - 1))] if ordered else 0.0


def classify(exc: BaseException) -> str:
    """The outcome name of a failed request; LOST when the error says nothing useful."""
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        shaped = "message" in body or "error" in body
        return f"HTTP {exc.status_code}" if shaped else LOST
    if isinstance(exc, RoutingError):  # lmfleet's typed errors reach the caller as they are
        return type(exc).__name__
    if isinstance(exc, openai.APIConnectionError):  # APITimeoutError included
        cause = exc.__cause__
        return f"{type(exc).__name__}({type(cause).__name__ if cause else ''})"
    if isinstance(exc, openai.APIError) and isinstance(exc.body, dict) and "message" in exc.body:
        # An error event ending a stream (the proxy's, when a node cut the stream).
        return f"error event ({exc.body.get('type')})"
    return LOST


async def request(
    client: openai.AsyncOpenAI, model: str, i: int, *, stream: bool, max_tokens: int, bound: float
) -> tuple[str, float]:
    started = time.monotonic()
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": f"request {i}"}
    ]
    try:
        with anyio.fail_after(bound):
            if stream:
                chunks = await client.chat.completions.create(
                    model=model, messages=messages, max_tokens=max_tokens, stream=True
                )
                async for _ in chunks:
                    pass
            else:
                await client.chat.completions.create(
                    model=model, messages=messages, max_tokens=max_tokens
                )
    except TimeoutError:
        return LOST, time.monotonic() - started
    except Exception as exc:  # noqa: BLE001 - every failure is classified, none is dropped
        return classify(exc), time.monotonic() - started
    return "ok", time.monotonic() - started


async def run_load(
    client: openai.AsyncOpenAI,
    model: str,
    *,
    total: int,
    concurrency: int,
    max_tokens: int = 16,
    bound: float = 30.0,
    stream_every: int = 2,
    during: Callable[[], Awaitable[None]] | None = None,
) -> Report:
    """`total` requests (every `stream_every`-th one streamed), `during` run alongside."""
    report = Report()
    limiter = anyio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            stream = stream_every > 0 and i % stream_every == 0
            outcome, seconds = await request(
                client, model, i, stream=stream, max_tokens=max_tokens, bound=bound
            )
        report.outcomes[outcome] += 1
        report.latencies.append(seconds)

    async with anyio.create_task_group() as tg:
        if during is not None:
            tg.start_soon(during)
        for i in range(total):
            tg.start_soon(one, i)
    return report


def load_through(fleet: Any, door: Door, *, timeout: float = 10.0, **kwargs: Any) -> Report:
    """`run_load` over `fleet.model` through `door` (the fleet's own client or its
    proxy), with `max_retries=0` so that openai's retries cannot hide the router."""
    client = door(fleet, timeout=timeout, max_retries=0)

    async def main() -> Report:
        async with client:
            return await run_load(client, fleet.model, **kwargs)

    return anyio.run(main)
