"""Model aliases and unification over real sims, through both front doors.

Each sim serves one name and answers any other with LMDeploy's 404, so a request
that reaches a node under the wrong name fails: every request succeeding on both
nodes shows that each node received its own name. The caller reads the alias back,
streamed or not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import openai
import pytest
from loadgen import Door
from support import SimNode, StartSim, sim_served

from lmfleet import LMFleet

HUB = "internlm/internlm2_5-7b-chat"
LOCAL = "/data/models/internlm2_5-7b-chat"
ALIAS = "internlm2.5-7b"
QUICK = ("--health-poll-interval", "0.2", "--ttft-ms", "5", "--tpot-ms", "2")

FleetOf = Callable[..., tuple[LMFleet, list[SimNode]]]


@pytest.fixture
def fleet_of(start_sim: StartSim) -> FleetOf:
    fleets: list[LMFleet] = []

    def make(names: list[str], **kwargs: object) -> tuple[LMFleet, list[SimNode]]:
        nodes = [start_sim(*QUICK, "--model", name) for name in names]
        fleet = LMFleet.attach([n.url for n in nodes], health_interval=0.2, **kwargs)  # type: ignore[arg-type]
        fleets.append(fleet)
        fleet.wait_ready(timeout=30, min_ready=len(nodes))
        return fleet, nodes

    yield make  # type: ignore[misc]
    for fleet in fleets:
        fleet.close()


async def ask(client: openai.AsyncOpenAI, model: str, count: int) -> list[str]:
    """`count` chats for `model`, every other one streamed: the model names each
    answer (and every chunk of a stream) gave back."""
    seen: list[str] = []

    async def one(i: int) -> None:
        messages = [{"role": "user", "content": f"hello {i}"}]
        if i % 2:
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=4, stream=True
            )
            seen.extend({chunk.model async for chunk in stream})
        else:
            reply = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=4
            )
            seen.append(reply.model)

    async with client, anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    return seen


def test_an_alias_reaches_each_node_under_its_own_name(fleet_of: FleetOf, door: Door) -> None:
    fleet, nodes = fleet_of([HUB, LOCAL], aliases={ALIAS: [HUB, LOCAL]}, strategy="round_robin")
    seen = anyio.run(ask, door(fleet, max_retries=0), ALIAS, 12)
    assert set(seen) == {ALIAS}
    assert [sim_served(n.url) for n in nodes] == [6, 6]
    # A real name still goes only to its own nodes.
    assert set(anyio.run(ask, door(fleet, max_retries=0), LOCAL, 4)) == {LOCAL}
    assert sim_served(nodes[1].url) == 10


def test_the_model_list_and_the_404_name_the_aliases(fleet_of: FleetOf, door: Door) -> None:
    fleet, _ = fleet_of([HUB, LOCAL], aliases={ALIAS: [HUB, LOCAL]})

    async def main() -> None:
        async with door(fleet, max_retries=0) as client:
            listed = {m.id: m for m in (await client.models.list()).data}
            assert set(listed) == {HUB, LOCAL, ALIAS}
            assert listed[ALIAS].model_extra["alias_of"] == [HUB, LOCAL]
            card = await client.models.retrieve(ALIAS)
            assert card.model_extra["alias_of"] == [HUB, LOCAL]
            with pytest.raises(openai.NotFoundError) as caught:
                await client.chat.completions.create(
                    model="internlm2.5", messages=[{"role": "user", "content": "x"}]
                )
            assert f"aliases: {ALIAS} ({HUB}, {LOCAL})" in str(caught.value)

    anyio.run(main)


def test_unify_models_joins_a_path_and_a_hub_id(fleet_of: FleetOf, door: Door) -> None:
    upper = "/data/models/InternLM2_5-7B-Chat"
    fleet, nodes = fleet_of([HUB, upper], unify_models=True, strategy="round_robin")
    assert set(anyio.run(ask, door(fleet, max_retries=0), upper, 8)) == {upper}
    assert [sim_served(n.url) for n in nodes] == [4, 4]


def test_unify_models_reports_an_ambiguous_pair_and_joins_nothing(
    fleet_of: FleetOf, door: Door, caplog: pytest.LogCaptureFixture
) -> None:
    other = "someone-else/internlm2_5-7b-chat"
    with caplog.at_level(logging.WARNING, logger="lmfleet"):
        fleet, nodes = fleet_of([HUB, other], unify_models=True)
    (why,) = fleet.registry.names.ambiguous
    assert "different organisations (internlm, someone-else)" in why
    assert any("unify_models:" in r.getMessage() and HUB in r.getMessage() for r in caplog.records)
    assert set(anyio.run(ask, door(fleet, max_retries=0), HUB, 6)) == {HUB}
    assert [sim_served(n.url) for n in nodes] == [6, 0]
