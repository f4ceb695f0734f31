"""Schedules of the routing-quality bench are pure data, equal for every router."""

from __future__ import annotations

from bench.routing_workload import (
    OUTPUT_MIX,
    SALT_WIDTH,
    closed_schedule,
    mean_output,
    open_schedule,
    run_salt,
)


def test_same_seed_same_schedule() -> None:
    assert open_schedule("chat", 4, 50, 10.0) == open_schedule("chat", 4, 50, 10.0)
    assert open_schedule("chat", 4, 50, 10.0) != open_schedule("chat", 5, 50, 10.0)


def test_load_levels_share_requests_and_scale_time() -> None:
    slow, fast = open_schedule("chat", 1, 40, 8.0), open_schedule("chat", 1, 40, 9.5)
    for a, b in zip(slow.requests, fast.requests, strict=True):
        assert (a.user, a.output_tokens) == (b.user, b.output_tokens)
        assert a.arrival * 8.0 == b.arrival * 9.5 or abs(a.arrival * 8.0 - b.arrival * 9.5) < 1e-9


def test_clients_do_not_move_prompts() -> None:
    one, three = open_schedule("chat", 2, 60, 5.0), open_schedule("chat", 2, 60, 5.0, clients=3)
    assert [r.user for r in one.requests] == [r.user for r in three.requests]
    assert {r.client for r in three.requests} == {0, 1, 2}


def test_outputs_stay_in_their_bands() -> None:
    sched = open_schedule("chat", 0, 2000, 10.0)
    low, high = min(b[1] for b in OUTPUT_MIX), max(b[2] for b in OUTPUT_MIX)
    outs = [r.output_tokens for r in sched.requests]
    assert low <= min(outs) and max(outs) <= high
    assert abs(sum(outs) / len(outs) - mean_output()) < 5


def test_arrivals_increase_at_the_rate() -> None:
    sched = open_schedule("chat", 0, 2000, 20.0)
    times = [r.arrival for r in sched.requests]
    assert times == sorted(times)
    assert 90 < times[-1] < 110  # 2000 arrivals at 20/s


def test_salt_has_a_fixed_width_and_starts_the_prompt() -> None:
    assert len(run_salt(3, 7)) == len(run_salt(1234, 9999)) == SALT_WIDTH
    request = open_schedule("prefix", 0, 3, 1.0).requests[2]
    assert request.sim_prompt(run_salt(3, 7)).startswith("<|system|>" + run_salt(3, 7))
    assert len(request.sim_prompt(run_salt(3, 7))) == len(request.sim_prompt())


def test_prefix_mix_continues_conversations() -> None:
    sched = open_schedule("prefix", 0, 300, 1.0)
    prompts = [r.sim_prompt() for r in sched.requests]
    continued = sum(
        any(p.startswith(q[: len(q) - 1]) for q in prompts[:i]) for i, p in enumerate(prompts)
    )
    assert continued > 150  # most requests extend an earlier prompt of their conversation


def test_closed_schedule_gives_every_client_the_primary_count() -> None:
    sched = closed_schedule("chat", 0, 10, (32, 2))
    assert len(sched.for_client(0)) == len(sched.for_client(1)) == 10
    assert sched.mode == "closed" and sched.concurrency == (32, 2)
