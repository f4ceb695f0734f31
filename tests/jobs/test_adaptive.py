"""`concurrency="auto"` (jobs/adaptive.py): the rule, then a batch over real sims whose
queues it keeps short."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai.types.chat import ChatCompletionMessageParam
from support import SimNode, StartSim, sim_stats

from lmfleet import ConfigError, LMFleet
from lmfleet.jobs.adaptive import AdaptiveConcurrency, Signals

ROOM = ((0.0, 4.0), (0.0, 4.0))
FULL = ((6.0, 8.0), (5.0, 8.0))  # both nodes queue: 16 running


def room(held: float) -> tuple[tuple[float, float], ...]:
    """Two nodes with room that run `held` requests between them, none waiting."""
    return ((0.0, held / 2), (0.0, held / 2))


def look(
    controller: AdaptiveConcurrency,
    nodes: tuple[tuple[float, float], ...],
    inflight: int,
    report: float,
    refused: int = 0,
) -> int:
    """One decision, made just after the report was read."""
    return controller.observe(Signals(nodes, refused, report), inflight, now=report + 0.01)


def test_slow_start_doubles_while_the_limit_holds_the_batch_back() -> None:
    c = AdaptiveConcurrency(maximum=100, start=8)
    assert look(c, room(8), inflight=8, report=1) == 16
    assert look(c, room(16), inflight=16, report=1) == 16  # the same report: no decision
    assert look(c, room(16), inflight=16, report=2) == 32
    assert look(c, room(5), inflight=5, report=3) == 32  # not binding: no growth
    assert look(c, room(32), inflight=32, report=4) == 64
    assert look(c, room(64), inflight=64, report=5) == 100  # the maximum


def test_slow_start_doubles_again_only_once_the_nodes_hold_the_last_doublings_requests() -> None:
    """A report read after a doubling can predate the requests it let out: doubling on
    it would double a limit the nodes never saw (the flake of 2026-12-05: 16 -> 128 on
    two late reports, while the nodes ran 16)."""
    c = AdaptiveConcurrency(maximum=500, start=16)
    assert look(c, room(0), inflight=16, report=1) == 16  # the batch has not reached them
    assert look(c, room(16), inflight=16, report=2) == 32
    assert look(c, room(16), inflight=32, report=3) == 32  # the 16 more are not there yet
    assert look(c, room(24), inflight=32, report=4) == 64  # they are coming
    # A node that gives no report hides where its share of the batch is: timing alone.
    partial = AdaptiveConcurrency(maximum=500, start=16)
    assert partial.observe(Signals(room(0), 0, 1.0, complete=False), 16, now=1.01) == 32
    # Out of slow start, a step of one per node needs no such proof.
    c = AdaptiveConcurrency(maximum=500, start=20)
    assert look(c, ((2.0, 8.0), (0.0, 6.0)), inflight=20, report=1) == 22
    assert look(c, ((2.0, 8.0), (0.0, 6.0)), inflight=22, report=2) == 24


def test_full_nodes_bring_the_limit_to_what_they_run_and_a_refill() -> None:
    c = AdaptiveConcurrency(maximum=500, start=64)
    assert look(c, FULL, inflight=64, report=1) == 48  # 3/4, not below the target
    assert look(c, FULL, inflight=48, report=2) == 36
    assert look(c, FULL, inflight=36, report=3) == 27
    assert look(c, FULL, inflight=27, report=4) == 20  # 16 running + a quarter
    assert look(c, FULL, inflight=20, report=5) == 20  # held
    # Out of slow start: room grows it by one per node.
    assert look(c, ROOM, inflight=20, report=6) == 22


def test_a_node_with_room_grows_it_one_step_unless_the_others_queue_a_refill() -> None:
    c = AdaptiveConcurrency(maximum=500, start=20)
    short = ((2.0, 8.0), (0.0, 6.0))  # the fast node queues a little, the other has room
    assert look(c, short, inflight=20, report=1) == 22  # slow start is over: one per node
    deep = ((9.0, 8.0), (0.0, 6.0))  # its queue is past a refill (a quarter of 14)
    assert look(c, deep, inflight=22, report=2) == 22  # growing would only deepen it


def test_no_growth_on_a_report_older_than_the_last_growth() -> None:
    c = AdaptiveConcurrency(maximum=500, start=8)
    assert c.observe(Signals(room(8), 0, 1.0), 8, now=1.5) == 16
    assert c.observe(Signals(room(16), 0, 1.2), 16, now=1.6) == 16  # read before the growth
    assert c.observe(Signals(room(16), 0, 1.7), 16, now=1.8) == 32
    assert c.observe(Signals(FULL, 0, 1.75), 32, now=1.9) == 24  # cuts need no wait


def test_a_refusal_cuts_the_limit() -> None:
    c = AdaptiveConcurrency(maximum=500, start=40)
    assert look(c, ROOM, inflight=40, report=1, refused=2) == 30
    assert not c.slow_start
    assert look(c, ROOM, inflight=30, report=2) == 32


@pytest.fixture
def sims(start_sim: StartSim) -> list[SimNode]:
    cost = ("--max-batch", "8", "--ttft-ms", "10", "--tpot-ms", "4", "--output-tokens", "24")
    return [start_sim(*cost, "--health-poll-interval", "0.2") for _ in range(2)]


@pytest.fixture
def fleet(sims: list[SimNode]) -> Iterator[LMFleet]:
    with LMFleet.attach([s.url for s in sims], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30, min_ready=2)
        yield fleet


def prompts(n: int) -> list[list[ChatCompletionMessageParam]]:
    return [[{"role": "user", "content": f"p{i}"}] for i in range(n)]


def test_auto_keeps_the_nodes_full_and_their_queues_short(
    sims: list[SimNode], fleet: LMFleet
) -> None:
    """Two nodes that decode 8 each: a fixed 256 would put 128 on each; `auto`
    (bounded by the same 256) holds about what they run plus a short refill."""
    result = fleet.chat_many(prompts(400), concurrency="auto", max_concurrency=256, progress=False)
    assert len(result.ok) == 400
    peaks = [sim_stats(s.url)["max_inflight"] for s in sims]
    # 16 running and a refill; slow start doubles to 32 once the nodes report the
    # first 16, and stops at the queue the next report shows (peaks of 33-40 seen):
    # far below the 256 a fixed setting would put there.
    assert sum(peaks) <= 48, peaks
    assert min(peaks) >= 8, peaks  # every node was kept full
    with pytest.raises(ConfigError, match="max_concurrency"):
        fleet.chat_many(prompts(1), concurrency="auto", max_concurrency=0, progress=False)
    with pytest.raises(ConfigError, match='"auto"'):
        fleet.chat_many(prompts(1), concurrency="many", progress=False)  # type: ignore[arg-type]
