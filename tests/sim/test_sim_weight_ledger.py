"""The weight ledger (pure) and /wakeup's all-or-nothing tag rule (in-process)."""

from __future__ import annotations

import zlib

import pytest

from lmfleet.sim.weights import ADMIN_LOG_SIZE, WeightLedger, call_line, payload_digest
from tests.sim.conftest import ClientFactory

JSON = {"content-type": "application/json"}


def test_digest_chains_crc32_over_payloads_in_order() -> None:
    ledger = WeightLedger()
    ledger.add_bucket("a")
    ledger.add_bucket({"b": [1, 2], "a": None})
    expected = zlib.crc32(b'{"a":null,"b":[1,2]}', zlib.crc32(b"a"))
    assert ledger.digest == f"{expected:08x}" == payload_digest(["a", {"a": None, "b": [1, 2]}])
    assert payload_digest(["a", {"b": [1, 2], "a": None}]) != payload_digest(
        [{"b": [1, 2], "a": None}, "a"]
    )
    assert payload_digest([]) == "00000000"


def test_finish_moves_the_digest_and_counts_serving_updates() -> None:
    ledger = WeightLedger()
    ledger.add_bucket("a")
    ledger.finish(serving=False)
    ledger.finish(serving=True)
    assert ledger.to_json() == {
        "updates": 2,
        "buckets": 0,
        "digest": "00000000",
        "last_digest": "00000000",  # the second update had no bucket
        "groups": [],
        "version": 2,
        "updated_while_serving": 1,
        "weight_version": "default",
    }


def test_admin_calls_keep_the_last_entries() -> None:
    ledger = WeightLedger()
    for i in range(ADMIN_LOG_SIZE + 5):
        ledger.record_call(f"POST /sleep?level={i}")
    assert len(ledger.admin_calls) == ADMIN_LOG_SIZE
    assert ledger.admin_calls[0] == "POST /sleep?level=5"


def test_call_line_keeps_the_query_as_received() -> None:
    scope = {"method": "POST", "path": "/wakeup", "query_string": b"tags=weights&tags=kv_cache"}
    assert call_line(scope) == "POST /wakeup?tags=weights&tags=kv_cache"
    assert call_line({**scope, "path": "/update_weights", "query_string": b""}, "finished") == (
        "POST /update_weights finished"
    )


@pytest.mark.anyio
async def test_wakeup_naming_an_awake_tag_wakes_nothing(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True) as client:
        await client.post("/sleep", headers=JSON)
        await client.post("/wakeup?tags=weights", headers=JSON)
        await client.post("/wakeup?tags=weights&tags=kv_cache", headers=JSON)  # weights awake
        assert (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
        await client.post("/wakeup?tags=kv_cache&tags=bogus", headers=JSON)
        assert (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
        await client.post("/wakeup?tags=kv_cache", headers=JSON)
        assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}
