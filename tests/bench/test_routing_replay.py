"""The routing-quality replay against hand-computed timings of the simulator's cost model.

Default cost model: TTFT 40 ms + 0.1 ms per uncached prompt token, 20 ms per token
times (1 + 0.02 x (running - 1)), all divided by speed. A user message of 375
characters makes a templated prompt of exactly 400 characters = 100 tokens.
"""

from __future__ import annotations

import math
import random

import pytest

from bench.routing_replay import (
    RULES,
    BlockCache,
    NodeModel,
    block_keys,
    capacity,
    jsq_speed,
    least_finish,
    lower_bound,
    prepare,
    replay,
)
from bench.routing_workload import MixMeans, Request, Schedule, open_schedule
from lmfleet.sim.engine import PrefixCache

TEMPLATE_CHARS = len("<|user|>") + 16 + len("\n")  # role tag, salt, newline


def user_text(tokens: int, tag: str = "a") -> str:
    """A user message whose templated prompt is exactly `tokens` tokens."""
    return (tag * (4 * tokens - TEMPLATE_CHARS))[: 4 * tokens - TEMPLATE_CHARS]


def req(index: int, arrival: float, tokens: int, output: int, client: int = 0) -> Request:
    """A request with a prompt of `tokens` tokens that shares no block with another index."""
    return Request(index, client, arrival, "", (), user_text(tokens, chr(97 + index)), output)


def open_of(*requests: Request) -> Schedule:
    return Schedule("chat", 0, "open", 1, tuple(requests), rate=1.0)


def node(**flags: float) -> NodeModel:
    return NodeModel(**flags)  # type: ignore[arg-type]


def test_prompt_tokens_of_helper() -> None:
    assert req(0, 0.0, 100, 1).prompt_tokens() == 100


def test_one_request_alone() -> None:
    result = replay(open_of(req(0, 0.0, 100, 3)), [node()], jsq_speed)
    assert result.ttft[0] == pytest.approx(0.050)
    assert result.latency[0] == pytest.approx(0.050 + 2 * 0.020)


def test_speed_divides_every_time() -> None:
    result = replay(open_of(req(0, 0.0, 100, 3)), [node(speed=0.5)], jsq_speed)
    assert result.latency[0] == pytest.approx(2 * 0.090)


def test_batch_slowdown_uses_running_count_at_each_step() -> None:
    # A: prefill 50 ms, 2 steps while B runs too (x1.02) -> 50 + 20.4 + 20.4 = 90.8 ms.
    # B: prefill 60 ms, steps start at 60, 80.4 (A running) -> 100.8 (A gone) -> 120.8 -> 140.8.
    sched = open_of(req(0, 0.0, 100, 3), req(1, 0.0, 200, 5))
    result = replay(sched, [node()], jsq_speed)
    assert result.latency[0] == pytest.approx(0.0908)
    assert result.latency[1] == pytest.approx(0.1408)


def test_fifo_queue_beyond_max_batch() -> None:
    # A runs 0-90 ms; B arrives at 10 ms, waits for the only slot, 90 + 50 + 20.
    sched = open_of(req(0, 0.0, 100, 3), req(1, 0.010, 100, 2))
    result = replay(sched, [node(max_batch=1)], jsq_speed)
    assert result.latency[1] == pytest.approx(0.160 - 0.010)
    assert result.ttft[1] == pytest.approx(0.140 - 0.010)


def test_prefix_cache_hit_on_repeat() -> None:
    # 400 characters = 6 full blocks of 64 = 96 cached tokens, 4 uncached.
    text = user_text(100, "x")
    sched = open_of(Request(0, 0, 0.0, "", (), text, 1), Request(1, 0, 1.0, "", (), text, 1))
    result = replay(sched, [node()], jsq_speed)
    assert result.cached_tokens == (0, 96)
    assert result.latency[1] == pytest.approx(0.040 + 0.0001 * 4)


def test_closed_loop_runs_back_to_back() -> None:
    requests = tuple(req(i, 0.0, 100, 3, client=i % 2) for i in range(6))
    sched = Schedule("chat", 0, "closed", 2, requests, concurrency=(1, 1))
    result = replay(sched, [node(max_batch=1)], jsq_speed)
    # One slot: 0 runs 0-90 ms; 1 (sent at 0) 90-180; each later one is sent when its
    # client's previous one ends and waits 90 ms for the other client's request.
    assert result.latency == pytest.approx((0.090, 0.180, 0.180, 0.180, 0.180, 0.180))


def test_closed_loop_stops_when_the_primary_client_is_done() -> None:
    later = [req(i, 0.0, 100, 3, client=1) for i in range(1, 6)]
    requests = (req(0, 0.0, 100, 3, client=0), *later)
    sched = Schedule("chat", 0, "closed", 2, requests, concurrency=(1, 1))
    result = replay(sched, [node(max_batch=1)], jsq_speed)
    assert result.latency[:2] == pytest.approx((0.090, 0.180))
    assert all(math.isnan(x) for x in result.latency[2:])


def test_block_cache_matches_the_simulators_prefix_cache() -> None:
    rng = random.Random(1)
    stems = ["".join(rng.choice("ab") for _ in range(300)) for _ in range(5)]
    ours, theirs = BlockCache(12), PrefixCache(12)
    for _ in range(200):
        prompt = rng.choice(stems)[: rng.randrange(0, 300)] + "z" * rng.randrange(0, 200)
        keys = block_keys(prompt)
        peeked = ours.peek(keys)
        got = ours.lookup_and_insert(keys)
        assert peeked == got
        assert 16 * got == theirs.lookup_and_insert(prompt)


def test_capacity_is_slots_over_full_batch_service_time() -> None:
    means = MixMeans(prompt_tokens=300.0, output_tokens=51.0)
    service = 0.040 + 0.0001 * 300 + 50 * 0.020 * (1 + 0.02 * 7)
    assert capacity([node(), node(speed=0.5)], means) == pytest.approx(1.5 * 8 / service)


def test_jsq_speed_sends_to_the_fast_node_first() -> None:
    sched = open_of(*(req(i, 0.001 * i, 100, 30) for i in range(4)))
    result = replay(sched, [node(speed=0.3), node()], jsq_speed)
    # Scores: slow node 1/0.3 = 3.33; fast node 1, 2, 3, then 4 > 3.33.
    assert result.node == (1, 1, 1, 0)


def test_least_finish_avoids_a_full_node() -> None:
    # Node 0 is faster but its one slot is busy for seconds; node 1 is free.
    sched = open_of(req(0, 0.0, 100, 200), req(1, 0.1, 100, 2))
    result = replay(sched, [node(max_batch=1), node(speed=0.5, max_batch=1)], least_finish)
    assert result.node == (0, 1)


@pytest.mark.parametrize("mix", ["chat", "prefix"])
def test_lower_bound_is_below_every_rule(mix: str) -> None:
    nodes = [node(speed=1.0, max_batch=4), node(speed=1 / 3, max_batch=4)]
    sched = open_schedule(mix, 3, 120, rate=4.0)
    prepared = prepare(sched)
    bound, bound_ttft = lower_bound(sched, nodes, prepared)
    for rule in RULES.values():
        result = replay(sched, nodes, rule, prepared)
        for i in range(len(sched.requests)):
            assert result.latency[i] >= bound[i] - 1e-9
            assert result.ttft[i] >= bound_ttft[i] - 1e-9
