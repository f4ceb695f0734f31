"""DistServe through the proxy: real uvicorn, real openai clients, real sims."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

import httpx2
import openai
import pytest
from distserve.pd_support import PD
from support import chat, sim_stats

from lmfleet import LMFleet
from lmfleet.cli.serve import add_arguments
from lmfleet.proxy import ProxyServer

Served = tuple[LMFleet, ProxyServer]


def _serve(pd: PD, serve_fleet: Callable[..., Served], **kwargs: object) -> Served:
    return serve_fleet(pd.urls, roles=pd.roles, serving_strategy="DistServe", **kwargs)


def test_proxy_runs_prefill_then_decode(
    start_pd: Callable[..., PD], serve_fleet: Callable[..., Served]
) -> None:
    pd = start_pd()
    fleet, server = _serve(pd, serve_fleet, strategy="least_connections")  # balance below
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    model = fleet.model
    for i in range(4):
        assert chat(client, model, f"q{i}").choices[0].message.content
        stream = chat(client, model, f"s{i}", stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert client.completions.create(model=model, prompt="hi", stream=False).choices[0].text
    with pytest.raises(openai.BadRequestError, match="n > 1 is not supported"):
        chat(client, model, "q", n=3)
    prefill, decode = pd.stats("prefill"), pd.stats("decode")
    assert sum(s["prefills"] for s in prefill) == sum(s["decodes"] for s in decode) == 9
    assert min(s["prefills"] for s in prefill) >= 4 and min(s["decodes"] for s in decode) >= 4
    assert all(s["local"] == 0 and s["preserved"] == 0 for s in prefill + decode)
    assert all(n.inflight == 0 for n in fleet.nodes)


def test_proxy_connects_each_pair_once_under_64_concurrent(
    start_pd: Callable[..., PD], serve_fleet: Callable[..., Served]
) -> None:
    pd = start_pd()
    fleet, server = _serve(pd, serve_fleet, strategy="random")

    async def burst() -> int:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        replies = await asyncio.gather(
            *[
                client.chat.completions.create(
                    model=fleet.model,
                    messages=[{"role": "user", "content": f"q{i}"}],
                    stream=i % 2 == 0,
                )
                for i in range(64)
            ]
        )
        await client.close()
        return len(replies)

    assert asyncio.run(burst()) == 64
    for s in pd.stats("prefill") + pd.stats("decode"):
        assert s["p2p_connect"] == 2  # two pairs per node, each connected once
    assert sum(s["decodes"] for s in pd.stats("decode")) == 64


def test_proxy_warmup_gc_and_dead_decode(
    start_pd: Callable[..., PD], serve_fleet: Callable[..., Served]
) -> None:
    pd = start_pd({3: ("--crash-after", "0")})
    fleet, server = _serve(pd, serve_fleet)
    warm = httpx2.post(server.url + "/distserve/connection_warmup", json={}, timeout=30)
    assert warm.json() == {"SUCCESS": True, "pairs": 4, "failed": []}
    assert all(s["p2p_connect"] == 2 for s in pd.stats("prefill"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    for i in range(4):
        assert chat(client, fleet.model, f"q{i}").choices[0].message.content
    prefill = pd.stats("prefill")
    assert all(s["p2p_connect"] == 2 for s in prefill)  # warm pairs were reused
    assert sum(s["freed"] for s in prefill) >= 1  # the dead decode's cache was freed
    assert all(s["preserved"] == 0 for s in prefill)
    gc = httpx2.post(server.url + "/distserve/gc", json={}, timeout=30).json()
    assert gc["freed"] == 0  # nothing stranded: every failure freed its own cache
    assert sim_stats(pd.urls[2])["distserve"]["decodes"] == 4


def test_hybrid_proxy_refuses_distserve_admin(
    start_pd: Callable[..., PD], serve_fleet: Callable[..., Served]
) -> None:
    pd = start_pd()
    _, server = serve_fleet(pd.urls, roles=pd.roles)
    answer = httpx2.post(server.url + "/distserve/connection_warmup", json={}, timeout=10)
    assert answer.status_code == 400 and "Hybrid" in answer.text


def test_cli_serving_strategy_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).serving_strategy == "Hybrid"
    assert parser.parse_args(["--serving-strategy", "DistServe"]).serving_strategy == "DistServe"
    with pytest.raises(SystemExit):
        parser.parse_args(["--serving-strategy", "Other"])
