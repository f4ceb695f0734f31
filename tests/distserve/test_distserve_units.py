"""The pure parts: LMDeploy's wire format and the pair table's deduplication."""

from __future__ import annotations

import threading

import pytest

from lmfleet import LMFleet
from lmfleet.config import FleetOptions
from lmfleet.errors import ConfigError
from lmfleet.node.state import NodeRole, parse_role
from lmfleet.transport import Router
from lmfleet.transport.distserve import PairPool
from lmfleet.transport.distserve import protocol as wire


def test_prefill_body_matches_lmdeploy() -> None:
    body = {"model": "m", "messages": [], "stream": True, "stream_options": {}, "max_tokens": 50}
    out = wire.prefill_body(body, "/v1/chat/completions")
    assert out == {
        "model": "m",
        "messages": [],
        "stream": False,
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "with_cache": True,
        "preserve_cache": True,
    }
    assert body["stream"] is True  # the caller's body is untouched
    assert "max_completion_tokens" not in wire.prefill_body({"prompt": "x"}, "/v1/completions")


def test_parse_prefill_and_migration_request() -> None:
    got = wire.parse_prefill({"id": "17", "cache_block_ids": [3, 4], "remote_token_ids": [9, 8]})
    assert got == wire.Prefilled(17, (3, 4), 8)
    assert wire.parse_prefill({"id": None}) == wire.Prefilled(0, (), 0)
    with pytest.raises(ValueError, match="not a session id"):
        wire.parse_prefill({"id": "chatcmpl-abc"})
    body = wire.decode_body({"model": "m"}, 2, "http://p:1", got)
    assert body["migration_request"] == {
        "protocol": 2,
        "remote_engine_id": "http://p:1",
        "remote_session_id": 17,
        "remote_block_ids": [3, 4],
        "remote_token_id": 8,
        "is_dummy_prefill": False,
    }


def test_engine_info_is_a_json_string() -> None:
    assert wire.engine_config('{"tp_size": 1}') == {"tp_size": 1}
    assert wire.engine_config({"tp_size": 2}) == {"tp_size": 2}
    with pytest.raises(ValueError):
        wire.engine_config({"nope": 1})
    assert wire.rdma_config("RoCE", True) == {"with_gdr": True, "link_type": 2}
    with pytest.raises(ValueError):
        wire.check_status({"status": 2}, "p2p_connect")


def test_one_owner_per_pair_under_threads() -> None:
    pool = PairPool()
    owners: list[bool] = []
    barrier = threading.Barrier(16)

    def claim() -> None:
        barrier.wait()
        state, owner = pool.claim(("p", "d"))
        owners.append(owner)
        if owner:
            pool.settle(("p", "d"), state)
        assert state.done.wait(5) and state.connected

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert owners.count(True) == 1 and pool.connects == 1


def test_failed_connect_is_forgotten_and_drop_returns_shelf() -> None:
    pool = PairPool()
    state, owner = pool.claim(("p", "d"))
    pool.settle(("p", "d"), state, "boom")
    assert owner and not state.connected and state.error == "boom"
    assert pool.claim(("p", "d"))[1]  # the next request tries afresh
    pool.shelve(("p", "d"), 5)
    assert pool.drop(("p", "d")) == {5}
    assert pool.pairs() == []


def test_options_and_roles() -> None:
    assert FleetOptions().serving_strategy == "Hybrid"
    assert parse_role("prefill") is NodeRole.PREFILL
    assert parse_role(3) is NodeRole.DECODE
    assert parse_role("1") is NodeRole.HYBRID
    with pytest.raises(ConfigError):
        parse_role("encoder")


def test_the_serving_mode_is_a_planner_fixed_when_the_fleet_is_built() -> None:
    """DistServe is handed to the transports as the fleet's planner; the router itself
    is never rewired (it stays the Hybrid planner that DistServe plans fall back on)."""
    with LMFleet.attach([], allow_empty=True, serving_strategy="DistServe") as fleet:
        assert fleet.distserve is not None and fleet.planner is fleet.distserve
        assert type(fleet.router).route is Router.route
        assert "route" not in vars(fleet.router)
    with LMFleet.attach([], allow_empty=True) as fleet:
        assert fleet.distserve is None and fleet.planner is fleet.router
