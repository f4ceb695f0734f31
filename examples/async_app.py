"""Use a fleet from an async application: one routed AsyncOpenAI shared by many tasks.

python examples/async_app.py                 # emulated nodes, no GPU
python examples/async_app.py http://gpu1:23333 http://gpu2:23333
"""

from __future__ import annotations

import asyncio
import sys

import openai

from lmfleet import LMFleet


async def answer(client: openai.AsyncOpenAI, model: str, question: str) -> str:
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=32, stream=True
    )
    parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    return "".join(parts)


async def main(urls: list[str]) -> None:
    if urls:
        fleet = LMFleet.attach(urls)
    else:
        fleet = LMFleet.simulate(nodes=3, sim_args=("--ttft-ms", "5", "--tpot-ms", "2"))
    async with fleet:  # closing ends any node the fleet launched
        await asyncio.to_thread(fleet.wait_ready, 120)
        async with fleet.async_client() as client:
            questions = [f"Question {i}?" for i in range(20)]
            answers = await asyncio.gather(*(answer(client, fleet.model, q) for q in questions))
            print(f"{len(answers)} streamed answers; first: {answers[0][:40]!r}")

        # Batches with bounded concurrency, retries and per-item errors:
        results = await fleet.achat_many(
            [[{"role": "user", "content": q}] for q in questions], concurrency=8, max_tokens=16
        )
        print(results.summary())
        print(fleet)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
