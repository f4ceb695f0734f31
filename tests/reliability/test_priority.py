"""Request priority over a real sim, through both front doors (lmfleet/priority.py).

The node runs 2 sequences at once (`--max-batch 2`) and queues the rest FIFO, as an
engine does. Once the fleet has seen it full, background requests (priority -1) wait
in the fleet instead of in the node's queue (but for `QUEUE_HEADROOM`, 2), so a
request of priority 0 sent after eight of them meets at most two ahead of it in the
node's queue, not six.
"""

from __future__ import annotations

import anyio
import httpx2
import openai
import pytest
from loadgen import Door
from support import StartSim, sim_stats, wait_until

from lmfleet import LMFleet
from lmfleet.registry import QUEUE_HEADROOM
from lmfleet.sim.options import DEFAULT_MODEL

SLOW = ("--health-poll-interval", "0.2", "--max-batch", "2", "--ttft-ms", "5")
SLOW += ("--tpot-ms", "20", "--output-tokens", "25", "--output-tokens-max", "25")
"""A request takes ~0.5 s; two run at once, the rest queue in the node."""


async def chat(client: openai.AsyncOpenAI, text: str, **kwargs: object) -> str:
    reply = await client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": text}],
        max_tokens=25,
        **kwargs,  # type: ignore[arg-type]
    )
    return reply.choices[0].message.content or ""


def test_background_requests_wait_in_the_fleet_and_priority_0_goes_first(
    start_sim: StartSim, door: Door
) -> None:
    node = start_sim(*SLOW)
    with LMFleet.attach([node.url], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        client = door(fleet, timeout=30, max_retries=0)
        finished: list[str] = []

        async def one(name: str, **kwargs: object) -> None:
            await chat(client, name, **kwargs)
            finished.append(name)

        def waited(probe: object) -> object:
            return anyio.to_thread.run_sync(lambda: wait_until(probe, timeout=20))  # type: ignore[arg-type]

        async def main() -> None:
            async with client:
                async with anyio.create_task_group() as tg:  # a burst that queues in the
                    for i in range(6):  # node: its capacity shows in its /metrics
                        tg.start_soon(chat, client, f"warm {i}")
                await waited(lambda: fleet.registry.get(node.url).capacity == 2)
                httpx2.post(node.url + "/sim/stats/reset", timeout=5).raise_for_status()
                async with anyio.create_task_group() as tg:
                    for i in range(8):  # half by header, half by body field
                        ask: dict[str, object] = (
                            {"extra_headers": {"x-lmfleet-priority": "-1"}}
                            if i % 2
                            else {"extra_body": {"lmfleet_priority": -1}}
                        )
                        tg.start_soon(lambda i=i, ask=ask: one(f"batch {i}", **ask))
                    await waited(lambda: fleet.registry.waiting >= 8 - 2 - QUEUE_HEADROOM)
                    tg.start_soon(one, "interactive")

        anyio.run(main)
        assert len(finished) == 9
        # Two background requests ran and two queued: the interactive one waited for
        # those (and one that finished while it was being sent) at most. Without
        # priority all eight would have been ahead of it.
        assert finished.index("interactive") <= 5, finished
        assert sim_stats(node.url)["max_inflight"] <= 2 + QUEUE_HEADROOM + 1  # no deep queue
        assert fleet.registry.held_back > 0


def test_a_key_carries_its_default_priority_and_a_bad_one_is_refused(
    start_sim: StartSim,
) -> None:
    node = start_sim("--fast", "--record-headers", "x-lmfleet-priority")
    with LMFleet.attach([node.url], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        server = fleet.serve(
            port=0, api_keys=["batch-key", "people-key"], key_priorities={"batch-key": -1}
        )
        for key in ("batch-key", "people-key"):
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
            assert client.chat.completions.create(
                model=DEFAULT_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
            ).choices
        explicit = openai.OpenAI(base_url=server.url + "/v1", api_key="batch-key", max_retries=0)
        explicit.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=2,
            extra_headers={"x-lmfleet-priority": "4"},  # its own wins over the key's
        )
        assert sim_stats(node.url)["headers"]["x-lmfleet-priority"] == {"-1": 1, "4": 1}
        with pytest.raises(openai.BadRequestError, match="integer priority"):
            explicit.chat.completions.create(
                model=DEFAULT_MODEL,
                messages=[{"role": "user", "content": "x"}],
                extra_body={"lmfleet_priority": "urgent"},
            )
