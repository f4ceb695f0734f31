"""Logprobs of LMDeploy 0.18 (PyTorch, `--logprobs-mode raw_logprobs`) against the simulator.

A second pair, started here: both sides `--logprobs-mode raw_logprobs` (without it
LMDeploy's PyTorch engine refuses every logprobs request with a 400; those cases
are in test_routes.py, on the session pair). The peer's stub engine hands the
server logprobs rows in the PyTorch engine's form (peer/stub_engine.py), so what
is checked here is LMDeploy's own validation and serialisation:

- `/v1/completions`: `logprobs: N` is accepted and answered with `"logprobs": null`
  (0.18 collects the engine's rows and drops them); `echo` is parsed and never read
  (the text is the completion only); `max_tokens: 0` is refused; a stream with
  `logprobs >= 1` sends its 200 head and breaks off ("logprobs is removed");
- chat: `choices[].logprobs.content[]` of `{token, bytes, logprob, top_logprobs}`,
  where `top_logprobs` excludes the chosen token; `output_token_logprobs` with
  `return_logprob`; the same per chunk when streamed, the finishing chunk bare;
- `/generate`: `meta_info`'s output and input (`logprob_start_len`, `max_tokens: 0`)
  logprob lists and their checks.

For each case: status, Content-Type, JSON shape, error message (as test_routes.py),
and where both sides produce the same number of tokens, the lengths of every list.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from conformance.exchange import JSON, Answer, Case, compare, send
from conformance.peer_support import API_KEY, Server, started_pair
from conformance.shapes import length_diff, shape_diff

from lmfleet import LMFleet
from tests.sim.test_sim_lm_eval import echo_answer, lm_eval_payload, parse_logprobs

MODE = ("--logprobs-mode", "raw_logprobs")
VALUES = frozenset({"bytes"})  # a token's UTF-8: its length is the token's, not structure
CHAT = {"model": "$MODEL", "messages": [{"role": "user", "content": "hello world"}]}
# Exactly what lm-eval's `local-completions` sends for loglikelihood (_create_payload,
# generate=False), with string prompts (tokenized_requests=False).
LM_EVAL = {
    "model": "$MODEL",
    "prompt": ["say hello world", "hello world"],
    "temperature": 0,
    "max_tokens": 1,
    "logprobs": 1,
    "seed": 1234,
    "echo": True,
}
IDS = [5, 6, 7, 8, 9, 10]  # /generate input_ids: both sides count len(IDS) prompt tokens
SCORE = {"input_ids": IDS, "return_logprob": True, "max_tokens": 0, "logprob_start_len": 1}


@dataclass(frozen=True)
class LpCase:
    case: Case
    lengths: bool = True  # same token counts on both sides: compare every list's length


def lp(name: str, path: str, body: Any, *, stream: bool = False, lengths: bool = True) -> LpCase:
    return LpCase(Case(name, "POST", path, body=body, stream=stream), lengths)


CASES = [
    # /v1/completions: accepted, logprobs null, echo ignored
    lp("completions-lm-eval", "/v1/completions", LM_EVAL),
    lp("completions-lm-eval-one", "/v1/completions", {**LM_EVAL, "prompt": "say hello"}),
    # lm-eval's default (tokenized_requests=True) sends token ids: preprocessing fails
    lp("completions-lm-eval-ids", "/v1/completions", {**LM_EVAL, "prompt": [[5, 6], [7]]}),
    lp("completions-logprobs-5", "/v1/completions", {**LM_EVAL, "logprobs": 5, "max_tokens": 3}),
    lp("completions-logprobs-0", "/v1/completions", {**LM_EVAL, "logprobs": 0}),
    lp("completions-echo-max-tokens-0", "/v1/completions", {**LM_EVAL, "max_tokens": 0}),
    lp("completions-logprobs-neg", "/v1/completions", {**LM_EVAL, "logprobs": -1}),
    lp("completions-echo-bad", "/v1/completions", {**LM_EVAL, "echo": "maybe"}),
    # chat
    lp("chat-logprobs", "/v1/chat/completions", {**CHAT, "logprobs": True, "max_tokens": 3}),
    lp(
        "chat-logprobs-top-3",
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": 3, "max_tokens": 3},
    ),
    lp(
        "chat-return-logprob",
        "/v1/chat/completions",
        {**CHAT, "return_logprob": True, "max_tokens": 3},
    ),
    lp(
        "chat-logprobs-both",
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": 2, "return_logprob": True, "max_tokens": 3},
    ),
    lp(
        "chat-logprobs-n-2",
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": 2, "n": 2, "max_tokens": 2},
    ),
    lp(
        "chat-logprobs-false",
        "/v1/chat/completions",
        {**CHAT, "logprobs": False, "max_tokens": 2},
    ),
    lp("chat-top-logprobs-only", "/v1/chat/completions", {**CHAT, "top_logprobs": 3}),
    lp(
        "chat-top-logprobs-21",
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": 21},
    ),
    lp(
        "chat-top-logprobs-neg",
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": -1},
    ),
    lp("chat-logprobs-bad", "/v1/chat/completions", {**CHAT, "logprobs": "maybe"}),
    lp(
        "chat-stream-logprobs",
        "/v1/chat/completions",
        {
            **CHAT,
            "logprobs": True,
            "top_logprobs": 2,
            "return_logprob": True,
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        stream=True,
    ),
    lp(
        "chat-stream-logprobs-plain",
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "max_tokens": 2, "stream": True},
        stream=True,
    ),
    # /generate: output logprobs
    lp(
        "generate-logprobs",
        "/generate",
        {"input_ids": IDS, "return_logprob": True, "max_tokens": 3},
    ),
    lp(
        "generate-top-3",
        "/generate",
        {"input_ids": IDS, "return_logprob": True, "top_logprobs_num": 3, "max_tokens": 3},
    ),
    lp(
        "generate-stream-logprobs",
        "/generate",
        {
            "input_ids": IDS,
            "return_logprob": True,
            "top_logprobs_num": 2,
            "max_tokens": 2,
            "stream": True,
        },
        stream=True,
    ),
    # /generate: the prompt's logprobs (what lm-eval's loglikelihood needs)
    lp("generate-score", "/generate", SCORE),
    lp("generate-score-top-2", "/generate", {**SCORE, "top_logprobs_num": 2}),
    lp("generate-score-from-0", "/generate", {**SCORE, "logprob_start_len": 0}),
    lp(
        "generate-score-prompt",  # tokenizers differ: shapes only
        "/generate",
        {
            "prompt": "say hello world",
            "return_logprob": True,
            "max_tokens": 0,
            "logprob_start_len": 0,
        },
        lengths=False,
    ),
    lp(
        "generate-score-stream",
        "/generate",
        {**SCORE, "top_logprobs_num": 2, "stream": True},
        stream=True,
    ),
    lp("generate-score-too-far", "/generate", {**SCORE, "logprob_start_len": len(IDS)}),
    lp("generate-score-max-tokens-1", "/generate", {**SCORE, "max_tokens": 1}),
    lp("generate-score-no-return", "/generate", {**SCORE, "return_logprob": False}),
    lp("generate-score-start-neg", "/generate", {**SCORE, "logprob_start_len": -2}),
    lp("generate-top-no-return", "/generate", {"input_ids": IDS, "top_logprobs_num": 2}),
    lp(
        "generate-top-neg",
        "/generate",
        {"input_ids": IDS, "return_logprob": True, "top_logprobs_num": -2},
    ),
    lp("generate-max-tokens-neg", "/generate", {"input_ids": IDS, "max_tokens": -1}),
]


@pytest.fixture(scope="module")
def lp_pair(peer_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    """A peer and a sim, both `--backend pytorch --logprobs-mode raw_logprobs`."""
    logs = tmp_path_factory.mktemp("logprobs-logs")
    common = ("--api-keys", API_KEY, *MODE)
    with started_pair(peer_model, logs, *common) as servers:
        yield servers


@pytest.fixture
def client() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=30) as c:
        yield c


def exchange(client: httpx2.Client, pair: list[Server], case: Case, model: str) -> list[Answer]:
    return [send(client, server.url, case, model) for server in pair]


@pytest.mark.parametrize("item", CASES, ids=[c.case.name for c in CASES])
def test_same_logprobs_answer(
    item: LpCase, lp_pair: list[Server], peer_model: Path, client: httpx2.Client
) -> None:
    case = item.case
    real, sim = exchange(client, lp_pair, case, str(peer_model))
    problems = compare(case, real, sim)
    if case.stream and real.media_type == sim.media_type == "text/event-stream":
        problems += stream_problems(real.body, sim.body, item.lengths)
    elif item.lengths:
        problems += length_diff(real.body, sim.body, values=VALUES)
    detail = f"\nreal: {real.text[:1500]}\nsim:  {sim.text[:1500]}"
    assert not problems, "\n".join(problems) + detail


def stream_problems(real: list[Any], sim: list[Any], lengths: bool) -> list[str]:
    """Chunk by chunk: the same number of events, each of the same shape (and lengths)."""
    if len(real) != len(sim):
        return [f"stream: real {len(real)} events, sim {len(sim)}"]
    out: list[str] = []
    for i, (a, b) in enumerate(zip(real, sim, strict=True)):
        out += [f"chunk {i}: {d}" for d in shape_diff(a, b)]
        if lengths:
            out += [f"chunk {i}: {d}" for d in length_diff(a, b, values=VALUES)]
    return out


def test_lm_eval_request_gets_null_logprobs_on_both(
    lp_pair: list[Server], peer_model: Path, client: httpx2.Client
) -> None:
    """LMDeploy 0.18 accepts lm-eval's loglikelihood request and returns no logprobs:
    echo is ignored (the text is the one generated token), `logprobs` is null."""
    case = Case("lm-eval", "POST", "/v1/completions", body=LM_EVAL)
    for answer in exchange(client, lp_pair, case, str(peer_model)):
        assert answer.status == 200, answer.text
        choices = answer.body["choices"]
        assert [c["logprobs"] for c in choices] == [None, None]
        assert answer.body["usage"]["completion_tokens"] == 2  # one token per prompt
        assert not any(c["text"].startswith("say hello") for c in choices)  # no echo


def test_chat_top_logprobs_follow_lmdeploy(
    lp_pair: list[Server], peer_model: Path, client: httpx2.Client
) -> None:
    """Both sides: n - 1 alternatives per greedy token, sorted, the chosen one left out."""
    body = {**CHAT, "logprobs": True, "top_logprobs": 4, "max_tokens": 5}
    case = Case("chat-top-4", "POST", "/v1/chat/completions", body=body)
    for answer in exchange(client, lp_pair, case, str(peer_model)):
        content = answer.body["choices"][0]["logprobs"]["content"]
        assert len(content) == answer.body["usage"]["completion_tokens"] == 5
        for item in content:
            alternatives = item["top_logprobs"]
            values = [alt["logprob"] for alt in alternatives]
            assert len(alternatives) == 3, item
            assert values == sorted(values, reverse=True)
            assert item["token"] not in {alt["token"] for alt in alternatives}
            assert item["logprob"] <= 0 and all(v <= item["logprob"] for v in values)
            assert item["bytes"] == list(item["token"].encode())


def broken_stream(client: httpx2.Client, url: str, body: dict[str, Any]) -> tuple[Any, ...]:
    """Status, media type, events read and how the body ended for a streamed request."""
    headers = {**JSON, "authorization": f"Bearer {API_KEY}"}
    events: list[str] = []
    ending = "complete"
    with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as response:
        media = response.headers.get("content-type", "").split(";")[0]
        try:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
        except httpx2.RemoteProtocolError:
            ending = "connection closed mid-body"
    return response.status_code, media, events, ending


def test_completions_stream_with_logprobs_breaks_off_on_both(
    lp_pair: list[Server], peer_model: Path
) -> None:
    """0.18's completion_stream_generator raises "logprobs is removed" on the first
    output with logprobs: a 200 event-stream head, no event, the connection cut."""
    body = {**LM_EVAL, "prompt": "say hello", "model": str(peer_model), "stream": True}
    answers = []
    for server in lp_pair:
        with httpx2.Client(timeout=30) as client:  # the cut connection is not reused
            answers.append(broken_stream(client, server.url, body))
    real, sim = answers
    assert real == (200, "text/event-stream", [], "connection closed mid-body")
    assert sim == real


def test_lm_eval_through_a_fleet_over_the_real_server(
    lp_pair: list[Server], peer_model: Path
) -> None:
    """The fleet answers lm-eval's request from real LMDeploy 0.18's `/generate`
    (lmfleet/transport/scoring.py): lm-eval's parser reads it, and the scores are the
    ones the node's `/generate` gives for the same tokens."""

    real = next(server for server in lp_pair if server.kind == "real")
    key = {"Authorization": f"Bearer {API_KEY}"}
    with httpx2.Client(base_url=real.url, headers=key, timeout=30) as node:
        ids = node.post("/v1/encode", json={"input": "say hello world", "add_bos": False})
        prompt = ids.json()["input_ids"]
        expected = parse_logprobs(echo_answer(node, prompt), ctxlens=[1])
    with LMFleet.attach([real.url], api_key=API_KEY, health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=60)
        payload = {**lm_eval_payload([prompt]), "model": str(peer_model)}
        completion = fleet.client(max_retries=0).completions.create(**payload)
    answer = completion.model_dump()
    assert parse_logprobs(answer, ctxlens=[1]) == expected
    rows = answer["choices"][0]["logprobs"]["token_logprobs"]
    assert rows[0] is None and len(rows) == len(prompt) + 1
    assert all(isinstance(v, float) and v <= 0 for v in rows[1:])
