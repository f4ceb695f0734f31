"""Logprobs of the simulator: LMDeploy 0.18's checks per engine, its response forms,
and the simulator's own rules for the values (lmfleet/sim/logprobs.py).

The shapes are checked against the real server in tests/conformance/test_logprobs.py;
here: the values (deterministic, <= 0, sorted, consistent between a stream and a
plain answer) and the engine switch (turbomind / pytorch with and without
`--logprobs-mode`), which the conformance peer (PyTorch only) cannot cover.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx2
import pytest

from lmfleet.sim import asgi
from lmfleet.sim import logprobs as lp
from tests.sim.conftest import MODEL, ClientFactory, chat_body

pytestmark = pytest.mark.anyio

RAW = {"fast": True, "backend": "pytorch", "logprobs_mode": "raw_logprobs"}
LM_EVAL = {
    "model": MODEL,
    "prompt": ["The capital of France is", " Paris"],
    "temperature": 0,
    "max_tokens": 1,
    "logprobs": 1,
    "seed": 1234,
    "echo": True,
}


def sse(response: httpx2.Response) -> list[dict[str, Any]]:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


async def test_pytorch_without_logprobs_mode_refuses_them(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True, backend="pytorch") as client:
        chat = await client.post("/v1/chat/completions", json=chat_body(logprobs=True))
        completions = await client.post("/v1/completions", json=LM_EVAL)
        generate = await client.post("/generate", json={"prompt": "x", "return_logprob": True})
        plain = await client.post("/v1/completions", json={**LM_EVAL, "logprobs": 0})
    assert chat.status_code == completions.status_code == generate.status_code == 400
    assert chat.json()["message"] == (
        "Logprobs(True)/top_logprobs(0) requested but not enabled logprobs_mode in engine "
        "configuration"
    )
    assert completions.json()["message"] == (
        "logprobs(1) requested but not enabled logprobs_mode in engine configuration."
    )
    assert plain.status_code == 200


async def test_turbomind_serves_logprobs_without_a_mode(asgi_client: ClientFactory) -> None:
    """TurbomindEngineConfig has no logprobs_mode: LMDeploy's checks are skipped."""
    async with asgi_client(fast=True) as client:  # turbomind: LMDeploy's default backend
        chat = await client.post(
            "/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=2, max_tokens=3)
        )
        only_top = await client.post("/v1/chat/completions", json=chat_body(top_logprobs=2))
        completions = await client.post("/v1/completions", json=LM_EVAL)
        score = await client.post(
            "/generate",
            json={
                "prompt": "abcdefgh",
                "return_logprob": True,
                "max_tokens": 0,
                "logprob_start_len": 0,
            },
        )
    assert len(chat.json()["choices"][0]["logprobs"]["content"]) == 3
    assert only_top.status_code == 200 and only_top.json()["choices"][0]["logprobs"] is None
    assert completions.status_code == 200
    assert [c["logprobs"] for c in completions.json()["choices"]] == [None, None]
    assert score.status_code == 400
    assert (
        score.json()["message"] == "input logprobs are supported only by the PyTorch hybrid engine."
    )


async def test_completions_ignore_echo_and_drop_logprobs(asgi_client: ClientFactory) -> None:
    async with asgi_client(**RAW) as client:
        data = (await client.post("/v1/completions", json=LM_EVAL)).json()
        zero = await client.post("/v1/completions", json={**LM_EVAL, "max_tokens": 0})
        ids = await client.post("/v1/completions", json={**LM_EVAL, "prompt": [[1, 2], [3]]})
        empty = (await client.post("/v1/completions", json={**LM_EVAL, "prompt": []})).json()
    assert [c["logprobs"] for c in data["choices"]] == [None, None]
    assert data["usage"]["completion_tokens"] == 2  # one token each: no echoed prompt
    assert not data["choices"][0]["text"].startswith("The capital")
    assert zero.status_code == 400
    assert zero.json()["message"] == "max_new_tokens must be at least 1, got 0."
    assert ids.status_code == 400 and ids.json()["message"] == "Request preprocessing failed."
    assert empty["choices"] == [] and empty["usage"]["total_tokens"] == 0


async def test_completions_stream_with_logprobs_breaks_off(asgi_client: ClientFactory) -> None:
    async with asgi_client(**RAW) as client:
        with pytest.raises(asgi.StreamDropped, match="logprobs is removed"):
            await client.post("/v1/completions", json={**LM_EVAL, "stream": True})
        fine = await client.post("/v1/completions", json={**LM_EVAL, "logprobs": 0, "stream": True})
    assert fine.status_code == 200 and sse(fine)


async def test_chat_logprobs_values(asgi_client: ClientFactory) -> None:
    body = chat_body("values", logprobs=True, top_logprobs=5, return_logprob=True, max_tokens=8)
    async with asgi_client(**RAW) as client:
        first = (await client.post("/v1/chat/completions", json=body)).json()
        again = (await client.post("/v1/chat/completions", json=body)).json()
        other = (await client.post("/v1/chat/completions", json={**body, "seed": 7})).json()
    choice = first["choices"][0]
    content = choice["logprobs"]["content"]
    assert first["choices"][0]["logprobs"] == again["choices"][0]["logprobs"]  # deterministic
    assert other["choices"][0]["logprobs"] != choice["logprobs"]  # the seed changes them
    assert len(content) == first["usage"]["completion_tokens"] == 8
    assert (
        "".join(item["token"] for item in content).replace("\u2581", " ")
        == (choice["message"]["content"])
    )
    for item, (value, token_id) in zip(content, choice["output_token_logprobs"], strict=True):
        alternatives = item["top_logprobs"]
        values = [alt["logprob"] for alt in alternatives]
        assert len(alternatives) == 4  # n - 1: the chosen (top-1) token is left out
        assert item["token"] not in {alt["token"] for alt in alternatives}
        assert values == sorted(values, reverse=True)
        assert item["logprob"] == value <= 0 and all(v < value for v in values)
        assert sum(math.exp(v) for v in [value, *values]) <= 1.0
        assert item["bytes"] == list(item["token"].encode())
        assert lp.token_text(token_id) == item["token"]


async def test_chat_stream_carries_the_same_logprobs(asgi_client: ClientFactory) -> None:
    body = chat_body("stream me", logprobs=True, top_logprobs=2, max_tokens=4)
    async with asgi_client(**RAW) as client:
        plain = (await client.post("/v1/chat/completions", json=body)).json()
        chunks = sse(
            await client.post(
                "/v1/chat/completions",
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            )
        )
    streamed = [
        i for c in chunks for ch in c["choices"] for i in ch.get("logprobs", {}).get("content", [])
    ]
    assert streamed == plain["choices"][0]["logprobs"]["content"]
    finish = chunks[-2]["choices"][0]  # LMDeploy's last engine output: a bare chunk
    assert finish == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "finish_reason": "length",
    }
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_n_choices_have_their_own_logprobs(asgi_client: ClientFactory) -> None:
    body = chat_body("two", logprobs=True, top_logprobs=2, max_tokens=3, n=2)
    async with asgi_client(**RAW) as client:
        data = (await client.post("/v1/chat/completions", json=body)).json()
    first, second = (c["logprobs"]["content"] for c in data["choices"])
    assert [i["logprob"] for i in first] != [i["logprob"] for i in second]


async def test_raw_logits_mode_returns_shifted_scores(asgi_client: ClientFactory) -> None:
    body = chat_body("logits", logprobs=True, top_logprobs=3, max_tokens=3)
    async with asgi_client(**RAW) as client:
        probs = (await client.post("/v1/chat/completions", json=body)).json()
    async with asgi_client(**{**RAW, "logprobs_mode": "raw_logits"}) as client:
        logits = (await client.post("/v1/chat/completions", json=body)).json()
    for p_item, l_item in zip(
        probs["choices"][0]["logprobs"]["content"],
        logits["choices"][0]["logprobs"]["content"],
        strict=True,
    ):
        shift = l_item["logprob"] - p_item["logprob"]
        assert 5 <= shift < 15
        for p_alt, l_alt in zip(p_item["top_logprobs"], l_item["top_logprobs"], strict=True):
            assert p_alt["token"] == l_alt["token"]
            assert l_alt["logprob"] - p_alt["logprob"] == pytest.approx(shift, abs=1e-5)


async def test_generate_output_and_input_logprobs(asgi_client: ClientFactory) -> None:
    ids = [11, 12, 13, 14, 15, 16, 17, 18]
    async with asgi_client(**RAW) as client:
        out = (
            await client.post(
                "/generate",
                json={
                    "input_ids": ids,
                    "return_logprob": True,
                    "top_logprobs_num": 3,
                    "max_tokens": 4,
                },
            )
        ).json()
        score = (
            await client.post(
                "/generate",
                json={
                    "input_ids": ids,
                    "return_logprob": True,
                    "top_logprobs_num": 2,
                    "max_tokens": 0,
                    "logprob_start_len": 2,
                },
            )
        ).json()
        too_far = await client.post(
            "/generate",
            json={
                "input_ids": ids,
                "return_logprob": True,
                "max_tokens": 0,
                "logprob_start_len": 8,
            },
        )
    meta = out["meta_info"]
    assert [pair[1] for pair in meta["output_token_logprobs"]] == out["output_ids"]
    for (value, token), top in zip(
        meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True
    ):
        assert top[0] == [value, token] and len(top) == 3  # generated: the top-1, kept in its list
    meta = score["meta_info"]
    assert score["text"] == "" and score["output_ids"] == [] and meta["completion_tokens"] == 0
    assert meta["prompt_tokens"] == len(ids) and meta["finish_reason"] == {"type": "length"}
    assert [pair[1] for pair in meta["input_token_logprobs"]] == ids[3:]
    assert meta["output_token_logprobs"] is None
    for (value, token), top in zip(
        meta["input_token_logprobs"], meta["input_top_logprobs"], strict=True
    ):
        values = [v for v, _ in top]
        assert len(top) == 2 and values == sorted(values, reverse=True) and value <= 0
        if token in {t for _, t in top}:
            assert value == values[[t for _, t in top].index(token)]
        else:
            assert value < values[-1]  # a prompt token outside the top n
    assert too_far.json()["message"] == (
        "logprob_start_len(8) exceeds the last source position for processed input_ids length(8)."
    )
