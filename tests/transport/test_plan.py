"""Whose timeout expired decides the node's mark (transport/plan.py `Attempts.bound`):
the caller's own read timeout is the caller giving up, as a disconnect is; the fleet's
first-byte bound is the node failing. Against a real slow `lmfleet sim`."""

from __future__ import annotations

import anyio
import httpx2
import openai
import pytest
from support import StartSim, sim_stats, wait_until, wait_until_async

from lmfleet import LMFleet, NodeStatus
from lmfleet.errors import NodeUnavailableError
from lmfleet.transport.plan import header_timeout, parse_timeout

# The first token at once, then one every 0.8 s: a stream's gaps and an assembled
# answer (40 s) both outlast a caller's 0.3 s read timeout.
SLOW = ("--health-poll-interval", "0.2", "--ttft-ms", "20", "--tpot-ms", "800")
MESSAGES = [{"role": "user", "content": "hi"}]


def test_a_callers_own_timeout_leaves_no_mark_against_the_node(start_sim: StartSim) -> None:
    sim = start_sim(*SLOW)
    with LMFleet.attach([sim.url]) as fleet:
        fleet.wait_ready(timeout=30)
        client = fleet.client(timeout=0.3, max_retries=0)
        # Six of each: five failures in a row would eject the node.
        for _ in range(6):
            with pytest.raises(openai.APITimeoutError):
                client.chat.completions.create(model=fleet.model, messages=MESSAGES)
        for _ in range(6):
            with pytest.raises(openai.APITimeoutError):
                stream = client.chat.completions.create(
                    model=fleet.model, messages=MESSAGES, stream=True
                )
                for _chunk in stream:  # the first chunk comes; the second is late
                    pass
        node = wait_until(lambda: fleet.nodes[0], until=lambda n: n.inflight == 0)
        assert (node.state, node.errors, node.ejections) == (NodeStatus.HEALTHY, 0, 0)
        wait_until(lambda: sim_stats(sim.url)["inflight"] == 0, what="the sim's requests end")


@pytest.mark.anyio
async def test_an_async_callers_timeout_leaves_none_either(start_sim: StartSim) -> None:
    sim = start_sim(*SLOW)
    with LMFleet.attach([sim.url]) as fleet:
        await anyio.to_thread.run_sync(lambda: fleet.wait_ready(timeout=30))
        client = fleet.async_client(timeout=0.3, max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.APITimeoutError):
                answer = await client.chat.completions.create(
                    model=fleet.model, messages=MESSAGES, stream=stream
                )
                async for _chunk in answer:  # type: ignore[union-attr]
                    pass
        node = await wait_until_async(lambda: fleet.nodes[0], until=lambda n: n.inflight == 0)
        assert (node.errors, node.ejections) == (0, 0)


def test_the_fleets_first_byte_bound_still_marks_the_node(start_sim: StartSim) -> None:
    # The same slow answer, bounded by the fleet (first byte within 0.3 s) under a
    # patient caller: the node failed to answer in time, and that counts.
    sim = start_sim(*SLOW)
    with LMFleet.attach([sim.url], first_byte_timeout=0.3) as fleet:
        fleet.wait_ready(timeout=30)
        client = fleet.client(timeout=30, max_retries=0)
        with pytest.raises(NodeUnavailableError, match=r"no first byte within 0\.3 s"):
            client.chat.completions.create(model=fleet.model, messages=MESSAGES)
        assert wait_until(lambda: fleet.nodes[0], until=lambda n: n.inflight == 0).errors > 0


@pytest.mark.parametrize("bad", ["-1", "0", "nan", "inf", "soon", ""])
def test_a_timeout_header_must_be_a_positive_number_of_seconds(bad: str) -> None:
    """lmfleet's header is the caller's word: one that is no wait is refused, naming the
    header (the router answers `bad_timeout`, tests/test_answers.py); openai's own
    header, which no caller writes by hand, is skipped when malformed."""
    with pytest.raises(ValueError, match="x-lmfleet-timeout must be a positive number"):
        parse_timeout(bad)
    assert header_timeout(httpx2.Headers({"x-stainless-read-timeout": bad})) is None
    assert parse_timeout(b"2.5") == 2.5
    sdk = {"x-stainless-read-timeout": "600"}
    assert header_timeout(httpx2.Headers(sdk)) == 600
    assert header_timeout(httpx2.Headers({**sdk, "x-lmfleet-timeout": "3"})) == 3
