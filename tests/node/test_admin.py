"""Aborting a fleet's requests (issue 27's `fleet.abort`), over real sim processes:
the callers get the partial answer ended with `finish_reason: "abort"`, and a node
started without `--enable-abort-handling` is named, not skipped."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from support import sim_stats, wait_until

from lmfleet import LMFleet
from lmfleet.errors import NodeCommandError

SLOW = ["--ttft-ms", "5", "--tpot-ms", "40"]
MESSAGES = [{"role": "user", "content": "tell me a long story"}]


@pytest.fixture
def fleet() -> Iterator[LMFleet]:
    with LMFleet.simulate(
        nodes=2, sim_args=[*SLOW, "--enable-abort-handling"], health_interval=0.2
    ) as fleet:
        fleet.wait_ready(timeout=60)
        yield fleet


def stream_in_thread(fleet: LMFleet, got: list[Any]) -> threading.Thread:
    """One streamed chat of up to 400 tokens; its chunks land in `got`."""
    client = fleet.client(max_retries=0)

    def run() -> None:
        for chunk in client.chat.completions.create(
            model=fleet.model,
            messages=MESSAGES,
            max_tokens=400,
            stream=True,  # type: ignore[arg-type]
        ):
            got.append(chunk)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def streaming(fleet: LMFleet) -> int:
    return sum(int(sim_stats(n.url)["streaming"]) for n in fleet.nodes)


def test_abort_ends_every_generation_with_its_partial_answer(fleet: LMFleet) -> None:
    got: list[Any] = []
    thread = stream_in_thread(fleet, got)
    wait_until(lambda: streaming(fleet) == 1, timeout=10)
    wait_until(lambda: len(got) >= 3, timeout=10)
    assert sorted(fleet.abort()) == sorted(n.url for n in fleet.nodes)
    thread.join(timeout=10)
    assert not thread.is_alive()
    reasons = [c.choices[0].finish_reason for c in got if c.choices and c.choices[0].finish_reason]
    assert reasons == ["abort"]
    assert len(got) < 400  # cut short, not finished


def test_the_proxy_aborts_one_node_or_all(fleet: LMFleet) -> None:
    proxy = fleet.serve(port=0)
    try:
        first = fleet.nodes[0].url
        one = httpx2.post(proxy.url + "/fleet/abort", params={"node": first}, timeout=10)
        assert one.status_code == 200, one.text
        assert one.json() == {"message": "aborted", "nodes": [first]}
        every = httpx2.post(proxy.url + "/fleet/abort", timeout=10)
        assert sorted(every.json()["nodes"]) == sorted(n.url for n in fleet.nodes)
    finally:
        proxy.stop()
    assert all(sim_stats(n.url)["by_path"]["/abort_request"] >= 1 for n in fleet.nodes)


def test_a_node_without_abort_handling_is_named() -> None:
    with LMFleet.simulate(nodes=1, sim_args=SLOW, health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=60)
        url = fleet.nodes[0].url
        with pytest.raises(NodeCommandError, match="--enable-abort-handling") as refused:
            fleet.abort()
        assert url in str(refused.value)
        proxy = fleet.serve(port=0)
        try:
            answer = httpx2.post(proxy.url + "/fleet/abort", timeout=10)
        finally:
            proxy.stop()
        assert answer.status_code == 502
        assert "--enable-abort-handling" in answer.json()["message"]
