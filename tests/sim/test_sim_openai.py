"""A real `python -m lmfleet.sim` process driven by the real openai clients."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from lmfleet.launch.process import ManagedProcess, free_port, wait_for_port
from tests.sim.conftest import MODEL

MESSAGES = [{"role": "user", "content": "Say something deterministic."}]


@pytest.fixture(scope="module")
def node_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One fast node shared by this module (the tests only read from it)."""
    port = free_port()
    log = Path(tmp_path_factory.mktemp("sim")) / "sim.log"
    argv = [sys.executable, "-m", "lmfleet.sim", "--host", "127.0.0.1", "--port", str(port)]
    proc = ManagedProcess([*argv, "--fast", "--output-tokens", "12"], log_path=log)
    try:
        wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate(grace=3.0)


@pytest.fixture
def client(node_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=node_url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_non_streaming_usage_and_finish(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    choice = first.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == again.choices[0].message.content
    assert choice.finish_reason == "stop"
    assert first.usage is not None
    assert first.usage.completion_tokens == 12
    assert first.usage.total_tokens == first.usage.prompt_tokens + 12


def test_chat_max_tokens_n_and_stop(client: openai.OpenAI) -> None:
    capped = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, n=3)  # type: ignore[arg-type]
    assert [c.index for c in capped.choices] == [0, 1, 2]
    assert {c.finish_reason for c in capped.choices} == {"length"}
    assert len({c.message.content for c in capped.choices}) > 1  # choices differ
    assert capped.usage is not None and capped.usage.completion_tokens == 9
    text = capped.choices[0].message.content or ""
    stop_word = text.split()[1]
    stopped = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        stop=[stop_word],
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop_word)]


def test_chat_streaming_with_include_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=5,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = {0: "", 1: ""}
    finishes: dict[int, str | None] = {}
    usage = None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
    assert finishes == {0: "length", 1: "length"}
    assert usage is not None and usage.completion_tokens == 10
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, n=2)  # type: ignore[arg-type]
    assert [c.message.content for c in full.choices] == [texts[0], texts[1]]


def test_streaming_without_include_usage_has_no_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
    )
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    done = client.completions.create(model=MODEL, prompt="abc", max_tokens=4)
    assert done.choices[0].finish_reason == "length"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="abc", max_tokens=4, stream=True)
        if c.choices
    )
    assert streamed == done.choices[0].text


def test_unknown_model_and_bad_fields_raise_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]
    assert missing.value.status_code == 404
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=-1)  # type: ignore[arg-type]


def test_raw_sse_ends_with_done(node_url: str) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 2}
    with httpx2.stream("POST", node_url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert len(lines) == 3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_async_client_stream_and_not(node_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=node_url + "/v1", api_key="x", max_retries=0) as c:
        full = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
        stream = await c.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=4,
            stream=True,
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == full.choices[0].message.content
    assert full.usage is not None and full.usage.completion_tokens == 4
