"""One `fleet.async_client()` in any event loop (transport/per_loop.py): a script's
`asyncio.run` after `asyncio.run`, and loops in two threads at once, against real
`lmfleet sim` processes."""

from __future__ import annotations

import asyncio
import threading

import openai
from support import StartSim

from lmfleet import LMFleet

FAST = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")
MESSAGES = [{"role": "user", "content": "hi"}]


async def _ask(client: openai.AsyncOpenAI, model: str, stream: bool) -> str | None:
    if not stream:
        answer = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
        return answer.choices[0].finish_reason
    finish = None
    async for chunk in await client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, stream=True
    ):
        finish = chunk.choices[0].finish_reason if chunk.choices else finish
    return finish


def test_one_async_client_serves_one_loop_after_another_and_two_at_once(
    start_sim: StartSim,
) -> None:
    sims = [start_sim(*FAST), start_sim(*FAST)]
    with LMFleet.attach([s.url for s in sims]) as fleet:
        fleet.wait_ready(timeout=30)
        client = fleet.async_client(max_retries=0)
        # The connections the first loop left in the pool died with it.
        for stream in (False, True, False, True):
            assert asyncio.run(_ask(client, fleet.model, stream)) == "length"

        finished: list[str | None] = []
        go = threading.Barrier(2)

        async def both_kinds() -> None:
            go.wait(10)  # the two loops run side by side
            for stream in (False, True, False):
                finished.append(await _ask(client, fleet.model, stream))

        threads = [threading.Thread(target=asyncio.run, args=(both_kinds(),)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert finished == ["length"] * 6
        assert asyncio.run(_ask(client, fleet.model, False)) == "length"
