"""lm-eval's loglikelihood request through a fleet: scored from `/generate`, both doors.

LMDeploy 0.18 answers lm-eval's request (`/v1/completions`, `echo`, `logprobs: 1`,
`max_tokens: 1`) with `logprobs: null` (tests/sim/test_sim_lm_eval.py pins it on a
node). Through the fleet the same request is answered from the leased node's
`/generate`, and lm-eval's own parser reads it: the same loglikelihood as the one
assembled by hand from a node's `/generate`, for token-id and text prompts.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx2
import openai
import pytest
from conftest import Served
from support import StartSim, sim_stats

from tests.sim.test_sim_lm_eval import (
    CONTEXT,
    CONTINUATION,
    RAW,
    echo_answer,
    encode,
    lm_eval_payload,
    parse_logprobs,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_lm_eval_loglikelihood_through_both_doors(
    start_sim: StartSim, serve_fleet: Callable[..., Served]
) -> None:
    nodes = [start_sim(*RAW), start_sim(*RAW)]
    fleet, proxy = serve_fleet([node.url for node in nodes])
    with httpx2.Client(base_url=nodes[0].url, timeout=10) as node:
        context, continuation = encode(node, CONTEXT), encode(node, CONTINUATION)
        ids, other = context + continuation, context + encode(node, " Lyon")
        expected = [
            parse_logprobs(echo_answer(node, prompt), ctxlens=[len(context)])[0]
            for prompt in (ids, other)
        ]
    payload = lm_eval_payload([ids, other])
    # The proxy, as lm-eval posts it (requests.post(url, json=payload)).
    answer = httpx2.post(proxy.url + "/v1/completions", json=payload, timeout=10)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert parse_logprobs(body, ctxlens=[len(context)] * 2) == expected
    assert expected[0][0] < 0  # a real loglikelihood, not a placeholder
    choice = body["choices"][0]
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1  # echo + 1 generated
    assert choice["logprobs"]["tokens"][: len(ids)] == [str(t) for t in ids]
    assert body["usage"]["completion_tokens"] == 2
    assert answer.headers["x-lmfleet-weight-version"] == "0"
    # The fleet's own client, through openai's SDK.
    client = fleet.client(max_retries=0)
    completion = client.completions.create(**payload)
    dumped = completion.model_dump()
    assert parse_logprobs(dumped, ctxlens=[len(context)] * 2) == expected
    served = sum(sim_stats(n.url)["by_path"].get("/generate", 0) for n in nodes)
    assert served >= 2 * 2 * 2  # two prompts, two /generate calls each, two doors
    assert sum(sim_stats(n.url)["by_path"].get("/v1/completions", 0) for n in nodes) == 0


def test_text_prompts_are_scored_too(
    start_sim: StartSim, serve_fleet: Callable[..., Served]
) -> None:
    """lm-eval with `tokenized_requests=False` sends text; the echo starts with it. The
    node's `/generate` calls carry the caller's trace context, as a forwarded request's
    headers do."""
    node = start_sim(*RAW, "--record-headers", "traceparent")
    _, proxy = serve_fleet([node.url])
    answer = httpx2.post(
        proxy.url + "/v1/completions",
        json=lm_eval_payload(CONTEXT + CONTINUATION),
        headers={"traceparent": TRACEPARENT},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert sim_stats(node.url)["headers"]["traceparent"] == {TRACEPARENT: 2}  # score, step
    choice = answer.json()["choices"][0]
    assert choice["text"].startswith(CONTEXT + CONTINUATION)
    rows = choice["logprobs"]["token_logprobs"]
    assert rows[0] is None and all(isinstance(v, float) and v <= 0 for v in rows[1:])
    assert len(rows) == len(choice["logprobs"]["top_logprobs"])


def test_a_node_that_cannot_score_answers_its_own_error(
    start_sim: StartSim, serve_fleet: Callable[..., Served]
) -> None:
    """The PyTorch engine without `--logprobs-mode` refuses logprobs (400); the caller
    gets the node's answer unchanged, and nothing is retried on another node."""
    node = start_sim("--fast", "--backend", "pytorch")
    fleet, proxy = serve_fleet([node.url])
    answer = httpx2.post(proxy.url + "/v1/completions", json=lm_eval_payload([CONTEXT]), timeout=10)
    assert answer.status_code == 400
    assert "logprobs_mode" in answer.json()["message"]
    with pytest.raises(openai.BadRequestError):
        fleet.client(max_retries=0).completions.create(**lm_eval_payload([CONTEXT]))


def test_requests_without_echo_are_forwarded_as_they_came(
    start_sim: StartSim, serve_fleet: Callable[..., Served]
) -> None:
    node = start_sim(*RAW)
    _, proxy = serve_fleet([node.url])
    payload = {**lm_eval_payload([CONTEXT]), "echo": False}
    answer = httpx2.post(proxy.url + "/v1/completions", json=payload, timeout=10)
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["logprobs"] is None  # LMDeploy 0.18's own answer
    assert sim_stats(node.url)["by_path"].get("/generate", 0) == 0
