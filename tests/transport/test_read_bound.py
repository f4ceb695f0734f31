"""A blocking read bounded tighter than its request's timeout (transport/read_bound.py),
over a real sim whose stream goes silent after a few tokens."""

from __future__ import annotations

import httpx2
import pytest
from support import StartSim

from lmfleet.transport.read_bound import BoundedReads, bounded_transport, read_bound

BODY = {"input_ids": [3, 4, 5], "max_tokens": 50, "ignore_eos": True, "stream": True}


def test_the_sync_transport_reads_through_bounded_reads() -> None:
    # httpx2 takes no network backend: should a release move its pool's, this fails
    # (and the sync client's stall bound would silently be the request's timeout).
    transport = bounded_transport(httpx2.Limits())
    assert isinstance(transport._pool._network_backend, BoundedReads)  # type: ignore[attr-defined]


def test_a_bound_cuts_a_silent_read_and_only_inside_its_block(start_sim: StartSim) -> None:
    node = start_sim("--ttft-ms", "5", "--tpot-ms", "2")
    httpx2.post(node.url + "/sim/faults", json={"stall_stream_after": 5}).raise_for_status()
    client = httpx2.Client(transport=bounded_transport(httpx2.Limits()), timeout=30)
    with client, client.stream("POST", node.url + "/generate", json=BODY) as answer:
        chunks = answer.iter_raw()
        with read_bound(5.0):
            assert next(chunks)  # a token comes well within the bound
        with read_bound(0.3), pytest.raises(httpx2.ReadTimeout):
            while True:  # the tokens before the stall, then silence
                next(chunks)
