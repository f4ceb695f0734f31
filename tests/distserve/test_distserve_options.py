"""LMDeploy's DistServe proxy options: `--dummy-prefill`, `--migration-protocol`,
`--link-type`, `--disable-gdr`, checked on the wire by real prefill/decode sims."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest
from distserve.pd_support import FAST, PD
from pydantic import ValidationError
from support import StartSim, chat, sim_stats

from lmfleet import LMFleet
from lmfleet.config import DistServeOptions, FleetOptions
from lmfleet.proxy import ProxyServer
from lmfleet.transport.distserve import protocol as wire

Served = tuple[LMFleet, ProxyServer]

DUMMY_MIGRATION = {
    "protocol": 2,
    "remote_engine_id": "dummy:dummy",
    "remote_session_id": 0,
    "remote_block_ids": [],
    "remote_token_id": 0,
    "is_dummy_prefill": True,
}
"""What LMDeploy 0.18's proxy sends a decode node with `--dummy-prefill`."""


def _options(**distserve: Any) -> FleetOptions:
    return FleetOptions(serving_strategy="DistServe", distserve=DistServeOptions(**distserve))


def _inference_calls(url: str) -> int:
    by_path = sim_stats(url)["by_path"]
    return sum(by_path.get(p, 0) for p in ("/v1/chat/completions", "/v1/completions"))


def test_options_take_lmdeploys_choices() -> None:
    assert DistServeOptions(migration_protocol="NVLINK").migration_protocol == "NVLINK"
    assert DistServeOptions().dummy_prefill is False
    with pytest.raises(ValidationError):
        DistServeOptions(migration_protocol="TCP")  # type: ignore[arg-type]  # not offered
    assert wire.dummy_decode_body({"model": "m"}, 3) == {
        "model": "m",
        "migration_request": {**DUMMY_MIGRATION, "protocol": 3},
    }


def test_proxy_with_dummy_prefill_calls_only_decode_nodes(
    start_pd: Callable[..., PD], serve_fleet: Callable[..., Served]
) -> None:
    pd = start_pd()
    fleet, server = serve_fleet(
        pd.urls,
        roles=pd.roles,
        options=_options(dummy_prefill=True),
        strategy="least_connections",  # the balance asserted below
    )
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    for i in range(2):
        assert chat(client, fleet.model, f"q{i}").choices[0].message.content
        stream = chat(client, fleet.model, f"s{i}", stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert client.completions.create(model=fleet.model, prompt="hi").choices[0].text
    for url in pd.of("prefill"):
        assert _inference_calls(url) == 0  # no prefill node was called
    prefill, decode = pd.stats("prefill"), pd.stats("decode")
    for s in prefill + decode:  # and no pair was connected, nothing freed or dropped
        assert s["p2p_initialize"] == s["p2p_connect"] == s["p2p_drop_connect"] == 0
        assert s["free_cache"] == s["refused"] == s["local"] == 0
    assert sum(s["dummy_decodes"] for s in decode) == sum(s["decodes"] for s in decode) == 5
    assert min(s["dummy_decodes"] for s in decode) >= 2  # balanced over both decode nodes
    assert all(s["last_migration"] == DUMMY_MIGRATION for s in decode)
    assert all(n.inflight == 0 for n in fleet.nodes)


def test_dummy_prefill_needs_no_prefill_node_and_fails_over(start_sim: StartSim) -> None:
    """LMDeploy's dummy mode asks only for a decode node; a dead one is replaced by
    another, with no cache to free and no pair to drop."""
    live = start_sim(*FAST, "--role", "decode")
    dead = start_sim(*FAST, "--role", "decode", "--crash-after", "0")
    options = _options(dummy_prefill=True, migration_protocol="NVLINK")
    with LMFleet.attach(
        [live.url, dead.url], roles=["decode", "decode"], options=options, health_interval=0.2
    ) as fleet:
        fleet.wait_ready(timeout=30, min_ready=2)
        client = fleet.client(max_retries=0)
        for i in range(4):
            assert chat(client, fleet.model, f"q{i}").choices[0].message.content
    assert dead.process.wait(timeout=10) is not None  # it was tried, and died
    stats = sim_stats(live.url)["distserve"]
    assert stats["dummy_decodes"] == 4
    assert stats["last_migration"] == {**DUMMY_MIGRATION, "protocol": 3}


def test_nvlink_protocol_link_type_and_gdr_reach_both_engines(start_pd: Callable[..., PD]) -> None:
    """`--migration-protocol NVLINK --link-type IB --disable-gdr`: protocol 3 in
    p2p_initialize, p2p_connect and migration_request; rdma_config {with_gdr: false,
    link_type: 1} sent as LMDeploy does (also with NVLINK, nvlink_config null)."""
    pd = start_pd()
    options = _options(migration_protocol="NVLINK", link_type="IB", with_gdr=False)
    with LMFleet.attach(pd.urls, roles=pd.roles, options=options, health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30, min_ready=len(pd.urls))
        client = fleet.client(max_retries=0)
        for i in range(4):
            assert chat(client, fleet.model, f"q{i}").choices[0].message.content
    link = {
        "protocol": 3,
        "rdma_config": {"with_gdr": False, "link_type": 1},
        "nvlink_config": None,
    }
    prefill, decode = pd.stats("prefill"), pd.stats("decode")
    for s, role in [(s, "decode") for s in prefill] + [(s, "prefill") for s in decode]:
        assert s["initialized"] and set(s["initialized"]) <= set(pd.of(role))
        assert all(sent == link for sent in s["initialized"].values())  # both sides
        assert set(s["connect_protocols"]) == set(s["initialized"])
        assert set(s["connect_protocols"].values()) == {3}
    assert sum(s["migrations_served"] for s in prefill) == 4  # the caches really moved
    for s in decode:
        migration = s["last_migration"]
        assert migration["protocol"] == 3 and migration["is_dummy_prefill"] is False
        assert migration["remote_engine_id"] in pd.of("prefill")
