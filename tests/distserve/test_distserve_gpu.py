"""Real LMDeploy DistServe: needs two GPUs with RDMA (skipped elsewhere).

Run on such a box with `pytest -m gpu tests/distserve` and
LMFLEET_DISTSERVE_PREFILL / LMFLEET_DISTSERVE_DECODE set to the URLs of
`lmdeploy serve api_server --role Prefill|Decode --backend pytorch` nodes.
"""

from __future__ import annotations

import os

import pytest
from support import chat

from lmfleet import LMFleet

PREFILL = os.environ.get("LMFLEET_DISTSERVE_PREFILL")
DECODE = os.environ.get("LMFLEET_DISTSERVE_DECODE")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (PREFILL and DECODE), reason="needs real LMDeploy Prefill and Decode nodes (RDMA)"
    ),
]


def test_real_lmdeploy_prefill_then_decode() -> None:
    assert PREFILL and DECODE
    fleet = LMFleet.attach(
        [PREFILL, DECODE], roles=["prefill", "decode"], serving_strategy="DistServe"
    )
    with fleet:
        fleet.wait_ready(timeout=600)
        client = fleet.client()
        # completions: LMDeploy's prefill answer id is the numeric session id there
        text = client.completions.create(model=fleet.model, prompt="Hello", max_tokens=16)
        assert text.choices[0].text
        assert chat(client, fleet.model, "Hello", stream=True)
