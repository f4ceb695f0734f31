"""The cost model, prefix cache, scheduler and text generator: pure and exact."""

from __future__ import annotations

import asyncio

import pytest

from lmfleet.sim.engine import BLOCK_CHARS, CostModel, PrefixCache, Scheduler, count_tokens
from lmfleet.sim.textgen import generate


def test_count_tokens_is_four_chars_rounded_up() -> None:
    assert [count_tokens(s) for s in ("", "a", "abcd", "abcde", "x" * 400)] == [0, 1, 1, 2, 100]


def test_cost_model_from_ms_scales_by_speed() -> None:
    base = CostModel.from_ms(
        ttft_ms=40, prefill_ms_per_token=0.1, tpot_ms=20, batch_slowdown=0.5, speed=1.0
    )
    slow = CostModel.from_ms(
        ttft_ms=40, prefill_ms_per_token=0.1, tpot_ms=20, batch_slowdown=0.5, speed=0.5
    )
    assert base.ttft == pytest.approx(0.040)
    assert base.tpot == pytest.approx(0.020)
    assert slow.ttft == pytest.approx(2 * base.ttft)
    assert slow.step_seconds(3) == pytest.approx(2 * base.step_seconds(3))


def test_prefill_grows_with_uncached_prompt_tokens() -> None:
    cost = CostModel(ttft=0.04, prefill_per_token=0.001, tpot=0.02, batch_slowdown=0.1)
    assert cost.prefill_seconds(0) == pytest.approx(0.04)
    assert cost.prefill_seconds(100) == pytest.approx(0.14)
    assert cost.prefill_seconds(100, cached_tokens=60) == pytest.approx(0.08)
    assert cost.prefill_seconds(10, cached_tokens=60) == pytest.approx(0.04)


def test_step_time_grows_with_running_batch() -> None:
    cost = CostModel(ttft=0.04, prefill_per_token=0.0, tpot=0.02, batch_slowdown=0.1)
    assert cost.step_seconds(0) == pytest.approx(0.02)
    assert cost.step_seconds(1) == pytest.approx(0.02)
    assert cost.step_seconds(11) == pytest.approx(0.04)
    steps = [cost.step_seconds(n) for n in range(1, 20)]
    assert steps == sorted(steps)


def test_prefix_cache_matches_whole_leading_blocks_only() -> None:
    cache = PrefixCache(capacity_blocks=100)
    system = "s" * (2 * BLOCK_CHARS)
    assert cache.lookup_and_insert(system + "first question") == 0
    # Same two leading blocks: 128 chars = 32 tokens cached.
    assert cache.lookup_and_insert(system + "second question") == 32
    # A different first block breaks the chain even if later text matches.
    assert cache.lookup_and_insert("x" * BLOCK_CHARS + system) == 0
    assert PrefixCache(0).lookup_and_insert(system * 3) == 0


def test_prefix_cache_evicts_least_recently_used() -> None:
    cache = PrefixCache(capacity_blocks=2)
    a, b, c = ("a" * BLOCK_CHARS, "b" * BLOCK_CHARS, "c" * BLOCK_CHARS)
    cache.lookup_and_insert(a)
    cache.lookup_and_insert(b)
    assert cache.lookup_and_insert(a) == 16  # a is now the most recent
    cache.lookup_and_insert(c)  # evicts b
    assert len(cache) == 2
    assert cache.lookup_and_insert(a) == 16
    assert cache.lookup_and_insert(b) == 0


@pytest.mark.anyio
async def test_scheduler_admits_up_to_max_batch_then_fifo() -> None:
    scheduler = Scheduler(max_batch=2)
    assert await scheduler.admit(1)
    assert await scheduler.admit(1)
    order: list[str] = []

    async def wait(name: str, slots: int) -> None:
        assert await scheduler.admit(slots)
        order.append(name)

    first = asyncio.create_task(wait("first", 2))
    second = asyncio.create_task(wait("second", 1))
    # asyncio.sleep(0) here and below: one pass of the event loop, so the woken tasks run
    # (deterministic in one loop: no time passes, nothing to wait for).
    await asyncio.sleep(0)
    assert (scheduler.running, scheduler.waiting) == (2, 2)
    scheduler.release(1)  # one slot free: "first" wants 2, "second" may not overtake
    await asyncio.sleep(0)
    assert order == [] and scheduler.waiting == 2
    scheduler.release(1)
    await asyncio.sleep(0)
    assert order == ["first"] and scheduler.running == 2
    scheduler.release(2)
    await asyncio.gather(first, second)
    assert order == ["first", "second"] and scheduler.running == 1


@pytest.mark.anyio
async def test_scheduler_abort_waiting_wakes_queue_with_false() -> None:
    scheduler = Scheduler(max_batch=1)
    assert await scheduler.admit(5)  # capped at the batch size
    assert scheduler.running == 1
    waiter = asyncio.create_task(scheduler.admit(1))
    await asyncio.sleep(0)  # one loop pass: the waiter queues
    assert scheduler.abort_waiting() == 1
    assert await waiter is False
    assert scheduler.running == 1


def test_generate_is_deterministic_and_respects_limits() -> None:
    kwargs = {"seed": 7, "index": 0, "output_tokens": 8}
    a = generate("prompt", max_tokens=None, **kwargs)  # type: ignore[arg-type]
    assert a == generate("prompt", max_tokens=None, **kwargs)  # type: ignore[arg-type]
    assert (a.tokens, a.finish_reason) == (8, "stop")
    assert generate("prompt", max_tokens=3, **kwargs).finish_reason == "length"  # type: ignore[arg-type]
    assert generate("prompt", max_tokens=3, **kwargs).text == "".join(a.pieces[:3])  # type: ignore[arg-type]
    assert generate("prompt", max_tokens=50, **kwargs).tokens == 8  # type: ignore[arg-type]
    long = generate("prompt", max_tokens=50, ignore_eos=True, **kwargs)  # type: ignore[arg-type]
    assert (long.tokens, long.finish_reason) == (50, "length")
    other_seed = generate("prompt", seed=8, index=0, output_tokens=8, max_tokens=None)
    other_choice = generate("prompt", seed=7, index=1, output_tokens=8, max_tokens=None)
    assert a.text != other_seed.text and a.text != other_choice.text


def test_generate_stop_cuts_before_the_stop_string() -> None:
    full = generate("p", seed=0, index=0, max_tokens=None, output_tokens=10)
    word = full.pieces[4].strip()
    cut = full.text.index(word)
    out = generate("p", seed=0, index=0, max_tokens=None, output_tokens=10, stop=(word,))
    assert out.text == full.text[:cut]
    assert out.finish_reason == "stop"
    assert word not in out.text
    assert out.tokens <= 5


def test_generate_natural_length_range_is_deterministic() -> None:
    lengths = {
        generate(
            f"p{i}", seed=0, index=0, max_tokens=None, output_tokens=4, output_tokens_max=9
        ).tokens
        for i in range(50)
    }
    assert lengths <= set(range(4, 10)) and len(lengths) > 2
