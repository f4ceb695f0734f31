"""DistServe through the in-process clients (sync and async): prefill then decode."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from distserve.pd_support import PD
from support import StartSim, chat, sim_stats, wait_until

from lmfleet import LMFleet, NodeStatus
from lmfleet.errors import NodeUnavailableError
from lmfleet.sim.options import DEFAULT_MODEL


def _fleet(pd: PD, **kwargs: object) -> LMFleet:
    fleet = LMFleet.attach(
        pd.urls,
        roles=pd.roles,
        serving_strategy="DistServe",
        health_interval=0.2,
        **kwargs,  # type: ignore[arg-type]
    )
    fleet.wait_ready(timeout=30, min_ready=len(pd.urls))
    return fleet


def test_every_request_prefills_then_decodes_balanced(start_pd: Callable[..., PD]) -> None:
    pd = start_pd()
    with _fleet(pd, strategy="least_connections") as fleet:  # the balance asserted below
        client = fleet.client()
        for i in range(4):
            reply = chat(client, fleet.model, f"question {i}")
            assert reply.choices[0].message.content
            stream = chat(client, fleet.model, f"streamed {i}", stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        raw = client.completions.with_raw_response.create(
            model=fleet.model, prompt="hello", max_tokens=8
        )
        assert raw.parse().choices[0].text
        assert raw.headers["x-lmfleet-weight-version"] == "0"  # the decode node's version
        nodes = {n.url: n for n in fleet.nodes}
        assert all(n.inflight == 0 for n in nodes.values())  # both leases ended
    prefill, decode = pd.stats("prefill"), pd.stats("decode")
    assert sum(s["prefills"] for s in prefill) == 9
    assert sum(s["decodes"] for s in decode) == 9
    assert sum(s["migrations_served"] for s in prefill) == 9  # each cache read by a decode
    # least_connections rotates ties: sequential requests alternate within each role.
    assert sorted(s["prefills"] for s in prefill) == [4, 5]
    assert sorted(s["decodes"] for s in decode) == [4, 5]
    for s in prefill + decode:
        assert s["local"] == 0 and s["refused"] == 0 and s["preserved"] == 0


def test_each_pair_connects_once_under_64_concurrent_first_requests(
    start_pd: Callable[..., PD],
) -> None:
    """Sync callers (threads) and async callers (one loop): one connect per pair each.

    `random` spreads 64 requests over all four (prefill, decode) pairs (a pair is
    missed with probability (3/4)**64); two fleets over the same sims, so every
    node ends with exactly 2 pairs x 2 fleets = 4 connects.
    """
    pd = start_pd()
    with _fleet(pd, strategy="random") as fleet:
        client = fleet.client()
        with ThreadPoolExecutor(64) as pool:
            replies = list(pool.map(lambda i: chat(client, fleet.model, f"s{i}"), range(64)))
        assert all(r.choices[0].message.content for r in replies)
        assert fleet.distserve is not None
        assert fleet.distserve.pool.connects == 4
    with _fleet(pd, strategy="random") as fleet:

        async def burst() -> list[str]:
            aclient = fleet.async_client()
            answers = await asyncio.gather(
                *[
                    aclient.chat.completions.create(
                        model=fleet.model, messages=[{"role": "user", "content": f"q{i}"}]
                    )
                    for i in range(64)
                ]
            )
            return [r.choices[0].message.content or "" for r in answers]

        assert all(asyncio.run(burst()))
        assert fleet.distserve is not None
        assert fleet.distserve.pool.connects == 4
    for s in pd.stats("prefill") + pd.stats("decode"):
        assert s["p2p_initialize"] == 4 and s["p2p_connect"] == 4
    assert sum(s["decodes"] for s in pd.stats("decode")) == 128
    assert min(s["prefills"] for s in pd.stats("prefill")) >= 32


def test_dead_decode_frees_prefill_cache_and_fails_over(start_pd: Callable[..., PD]) -> None:
    # Node 3 (a decode node) dies on its first inference request: mid-migration.
    pd = start_pd({3: ("--crash-after", "0")})
    dead = pd.urls[3]
    with _fleet(pd, wait_for_node=5) as fleet:
        client = fleet.client()
        for i in range(6):
            assert chat(client, fleet.model, f"q{i}").choices[0].message.content
        wait_until(  # the monitor (or the next connect error) sees it
            lambda: {n.url: n.state for n in fleet.nodes}[dead],
            5,
            "the dead decode node out of rotation",
            until=lambda state: state is not NodeStatus.HEALTHY,
        )
    prefill = pd.stats("prefill")
    assert sum(s["freed"] for s in prefill) >= 1  # the stranded cache was freed
    assert sum(s["p2p_drop_connect"] for s in prefill) >= 1  # and the pair dropped
    assert all(s["preserved"] == 0 for s in prefill)
    assert sim_stats(pd.urls[2])["distserve"]["decodes"] == 6  # the live decode node


def test_only_dead_decodes_fail_clearly(start_pd: Callable[..., PD]) -> None:
    pd = start_pd({2: ("--crash-after", "0"), 3: ("--crash-after", "0")})
    with _fleet(pd, wait_for_node=0.5) as fleet:
        with pytest.raises(NodeUnavailableError) as info:
            chat(fleet.client(max_retries=0), fleet.model, "q")
        assert isinstance(info.value, openai.APIConnectionError)
        assert "DistServe" in str(info.value) and "decode" in str(info.value)
    assert all(s["preserved"] == 0 for s in pd.stats("prefill"))


def test_hybrid_nodes_keep_serving_their_requests(
    start_pd: Callable[..., PD], start_sim: StartSim
) -> None:
    pd = start_pd()
    hybrid = start_sim("--fast", "--health-poll-interval", "0.2", "--model-name", "other")
    urls, roles = [*pd.urls, hybrid.url], [*pd.roles, "hybrid"]
    fleet = LMFleet.attach(urls, roles=roles, serving_strategy="DistServe", health_interval=0.2)
    with fleet:
        fleet.wait_ready(timeout=30, min_ready=len(urls))
        client = fleet.client()
        assert chat(client, "other", "to the hybrid node").choices[0].message.content
        assert chat(client, DEFAULT_MODEL, "prefill then decode").choices[0].message.content
    assert sim_stats(hybrid.url)["distserve"]["local"] == 1
    assert sim_stats(hybrid.url)["completed"] == 1
    assert sum(s["decodes"] for s in pd.stats("decode")) == 1


def test_n_above_one_is_400(start_pd: Callable[..., PD]) -> None:
    pd = start_pd()
    with (
        _fleet(pd) as fleet,
        pytest.raises(openai.BadRequestError, match="n > 1 is not supported"),
    ):
        chat(fleet.client(), fleet.model, "q", n=2)
    assert sum(s["prefills"] for s in pd.stats("prefill")) == 0


def test_hybrid_strategy_is_the_default(start_pd: Callable[..., PD]) -> None:
    pd = start_pd()
    fleet = LMFleet.attach(pd.urls, roles=pd.roles, health_interval=0.2)
    with fleet:
        fleet.wait_ready(timeout=30, min_ready=4)
        assert fleet.distserve is None
        assert chat(fleet.client(), fleet.model, "q", n=2).choices


def test_both_phases_carry_the_callers_trace_context(start_pd: Callable[..., PD]) -> None:
    record = ("--record-headers", "traceparent")
    pd = start_pd({i: record for i in range(4)})
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with _fleet(pd) as fleet:
        client = fleet.client(max_retries=0).with_options(default_headers={"traceparent": trace})
        assert chat(client, fleet.model, "traced").choices[0].message.content
    for role in ("prefill", "decode"):  # one node of each got the request, with the trace
        seen = [sim_stats(url)["headers"].get("traceparent", {}) for url in pd.of(role)]
        assert sum(s.get(trace, 0) for s in seen) == 1, (role, seen)
