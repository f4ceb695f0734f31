"""`chat_many` / `complete_many` against real `lmfleet sim` processes (issue 6 acceptance)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import anyio
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from support import SimNode, StartSim, sim_served, wait_until

from lmfleet import ConfigError, ItemError, LMFleet
from lmfleet.jobs.results import Answered
from lmfleet.notebook.batch import NO_TQDM_HINT, run_batch

FAST = ("--health-poll-interval", "0.5", "--ttft-ms", "5", "--tpot-ms", "2")


@pytest.fixture
def sims(start_sim: StartSim) -> list[SimNode]:
    return [start_sim(*FAST, "--output-tokens", "8") for _ in range(3)]


@pytest.fixture
def fleet(sims: list[SimNode]) -> Iterator[LMFleet]:
    with LMFleet.attach([s.url for s in sims], health_interval=0.2, wait_for_node=10) as fleet:
        fleet.wait_ready(timeout=30, min_ready=3)
        yield fleet


def conversations(n: int) -> list[list[ChatCompletionMessageParam]]:
    """Item i's prompt has (i % 5 + 1) words, so `usage.prompt_tokens` reveals its order."""
    return [[{"role": "user", "content": " ".join(["word"] * (i % 5 + 1))}] for i in range(n)]


def test_chat_many_survives_a_node_killed_half_way(sims: list[SimNode], fleet: LMFleet) -> None:
    total = 1000
    victim = sims[1]
    done = threading.Event()

    def killer() -> None:
        wait_until(
            lambda: done.is_set() or sum(n.served for n in fleet.nodes) >= total // 2,
            60,
            "half the batch served",
            step=0.005,
        )
        if not done.is_set():
            victim.process.kill()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = fleet.chat_many(conversations(total), concurrency=32, progress=False, max_tokens=8)
    done.set()
    thread.join()

    assert victim.process.wait(timeout=5) is not None
    assert len(result) == total
    # Nothing lost: every slot holds a response or that item's own error.
    for i, item in enumerate(result):
        if isinstance(item, ItemError):
            assert item.index == i
    # Cut-off requests were retried on the surviving nodes.
    assert result.errors == [], result.summary()
    assert all(isinstance(item, ChatCompletion) for item in result)
    # Input order: the prompt length pattern comes back in the same order.
    by_residue: dict[int, set[int]] = {}
    for i, item in enumerate(result.ok):
        assert item.usage is not None
        by_residue.setdefault(i % 5, set()).add(item.usage.prompt_tokens)
    assert all(len(tokens) == 1 for tokens in by_residue.values())
    assert len({next(iter(t)) for t in by_residue.values()}) == 5
    assert result.tokens == sum(item.usage.completion_tokens for item in result.ok if item.usage)
    assert result.summary().startswith(f"{total}/{total} ok, 0 failed")
    assert all(text for text in result.texts)
    # After the kill, the others carried the rest.
    nodes = {n.url: n for n in fleet.nodes}
    others = [nodes[s.url].served for s in sims if s is not victim]
    assert sum(others) > total // 2 - 64


def test_failed_items_are_reported_not_raised(fleet: LMFleet) -> None:
    # An unknown model is a 404 from the router: not retried, reported per item.
    result = fleet.chat_many(conversations(5), model="no-such-model", progress=False)
    assert len(result) == 5
    assert result.ok == []
    assert [e.index for e in result.errors] == [0, 1, 2, 3, 4]
    assert all(e.attempts == 1 for e in result.errors)
    assert all(isinstance(e.error, openai.NotFoundError) for e in result.errors)
    assert "0/5 ok, 5 failed" in result.summary()
    with pytest.raises(RuntimeError):
        result.raise_for_errors()


def test_complete_many_and_async_twins(fleet: LMFleet) -> None:
    prompts = [f"prompt {i}" for i in range(40)]
    result = fleet.complete_many(prompts, concurrency=8, progress=True, max_tokens=4)
    assert len(result) == 40 and not result.errors
    assert all(isinstance(item, Completion) for item in result)

    async def main() -> tuple[int, int]:
        chats = await fleet.achat_many(conversations(20), concurrency=4, progress=False)
        completions = await fleet.acomplete_many(prompts[:10], progress=False, max_tokens=2)
        return len(chats.ok), len(completions.ok)

    assert anyio.run(main) == (20, 10)
    with pytest.raises(ConfigError):
        fleet.chat_many(conversations(1), stream=True)


def test_a_string_is_the_users_message_and_a_wrong_shape_sends_nothing(
    sims: list[SimNode], fleet: LMFleet
) -> None:
    # The README's `chat_many(prompts)`: each string is one user message, as the
    # equivalent conversation (the sims count its words as prompt tokens), not a
    # list of one-letter messages that every node refuses.
    texts = ["word", "word word word", "word word"]
    given = fleet.chat_many(texts, progress=False, max_tokens=2)
    wrapped = fleet.chat_many([[{"role": "user", "content": t}] for t in texts], progress=False)
    assert not given.errors, given.summary()
    assert [c.usage.prompt_tokens for c in given] == [c.usage.prompt_tokens for c in wrapped]  # type: ignore[union-attr]
    assert len({c.usage.prompt_tokens for c in given}) == 3  # type: ignore[union-attr]

    served = [sim_served(s.url) for s in sims]
    wrong: list[tuple[object, str]] = [
        ("hello", "for one, give a list of one"),  # the whole batch as one string
        ([{"role": "user", "content": "hi"}], "item 0 is one message"),
        ([[{"role": "user", "content": "hi"}], None], "item 1 is a NoneType"),
        ([["hi"]], "item 0 is a list whose messages are not all dicts"),
    ]
    for inputs, said in wrong:
        with pytest.raises(ConfigError, match=said):
            fleet.chat_many(inputs, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"item 0 is a list \(messages: use chat_many\)"):
        fleet.complete_many([[{"role": "user", "content": "hi"}]], progress=False)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="complete_many takes a list of prompts"):
        fleet.complete_many("a prompt", progress=False)
    assert [sim_served(s.url) for s in sims] == served  # refused before any request


def test_run_batch_retries_then_reports() -> None:
    calls: dict[int, int] = {}

    async def flaky(item: int) -> Answered[int]:
        calls[item] = calls.get(item, 0) + 1
        if item % 3 == 0 and calls[item] < 2:  # fails once, then succeeds
            raise openai.APIConnectionError(request=_request())
        if item == 4:  # always fails
            raise openai.APIConnectionError(request=_request())
        if item == 5:  # not retryable
            raise ValueError("bad item")
        return Answered(item * 10, 1)

    async def main() -> object:
        return await run_batch(
            list(range(9)), flaky, concurrency=3, retries=2, progress=False, backoff=0
        )

    result = anyio.run(main)
    assert len(result) == 9  # type: ignore[arg-type]
    assert [e.index for e in result.errors] == [4, 5]  # type: ignore[attr-defined]
    assert result.errors[0].attempts == 3  # type: ignore[attr-defined]
    assert result.errors[1].attempts == 1  # type: ignore[attr-defined]
    assert result.ok == [0, 10, 20, 30, 60, 70, 80]  # type: ignore[attr-defined]
    assert calls[3] == 2 and calls[4] == 3 and calls[5] == 1


def _request() -> object:
    import httpx2

    return httpx2.Request("POST", "http://127.0.0.1:1/v1/chat/completions")


def test_stream_true_is_refused_with_what_to_do_instead() -> None:
    with (
        LMFleet.attach("http://127.0.0.1:9", health_interval=60) as fleet,  # never asked
        pytest.raises(ConfigError) as caught,
    ):
        fleet.chat_many(conversations(1), model="m", stream=True)
    message = str(caught.value)
    assert "stream=True is not supported" in message
    assert "leave stream out" in message and "fleet.async_client()" in message


NO_TQDM = """
import sys
sys.modules["tqdm"] = None  # as if the `notebook` extra were not installed
from lmfleet import LMFleet
with LMFleet.simulate(nodes=1, health_interval=0.2) as fleet:
    fleet.wait_ready(timeout=60)
    for _ in range(2):
        result = fleet.chat_many([[{"role": "user", "content": "hi"}]] * 3, max_tokens=2)
        print(len(result.ok))
"""


def test_missing_tqdm_is_said_once_per_process() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_TQDM], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "3"]
    assert done.stderr.count(NO_TQDM_HINT) == 1, done.stderr
    assert "pip install 'lmfleet[notebook]'" in NO_TQDM_HINT
