"""lm-eval's loglikelihood requests against simulated nodes, and what LMDeploy 0.18 answers.

lm-evaluation-harness's `local-completions` model scores a (context, continuation)
pair with one `/v1/completions` request (lm_eval 0.4.13,
`lm_eval/models/openai_completions.py`, `LocalCompletionsAPI._create_payload` with
`generate=False`):

    {"model", "prompt", "temperature": 0, "max_tokens": 1, "logprobs": 1,
     "seed": 1234, "echo": True}

and reads the echoed prompt's logprobs with `parse_logprobs` (copied below). The
prompt is token ids by default (`tokenized_requests=True`), strings otherwise.

LMDeploy 0.18.0 cannot answer it (read from its source and checked against the real
server in tests/conformance/test_logprobs.py), and the simulator, emulating it,
answers the same:

- PyTorch engine without `--logprobs-mode`: 400 `logprobs(1) requested but not
  enabled logprobs_mode in engine configuration.`;
- PyTorch with `--logprobs-mode`, or TurboMind: 200 with `"logprobs": null` for every
  choice (endpoints/completions.py sets `logprobs = None`; `echo` is never read, so
  the text is the one generated token); `parse_logprobs` fails on it;
- token-id prompts: 400 `Request preprocessing failed.`

What 0.18 does offer for scoring a prompt is `/generate` with `return_logprob`,
`logprob_start_len` and `max_tokens: 0` (PyTorch hybrid engine, `--logprobs-mode`):
the last test assembles lm-eval's expected answer from it, through a simulated
fleet, and runs lm-eval's parser on it.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import itemgetter
from typing import Any

import httpx2
import openai
import pytest
from conftest import Served
from support import StartSim

from tests.sim.conftest import MODEL

FAST = ("--fast",)
RAW = (*FAST, "--backend", "pytorch", "--logprobs-mode", "raw_logprobs")
CONTEXT = "Question: What is the capital of France?\nAnswer:"
CONTINUATION = " Paris"


def lm_eval_payload(messages: Any, seed: int = 1234) -> dict[str, Any]:
    """`LocalCompletionsAPI._create_payload(messages, generate=False)` (lm_eval 0.4.13)."""
    return {
        "model": MODEL,
        "prompt": messages,
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": seed,
        "echo": True,
    }


def parse_logprobs(
    outputs: dict[str, Any] | list[dict[str, Any]],
    tokens: list[list[int]] | None = None,
    ctxlens: list[int] | None = None,
) -> list[tuple[float, bool]]:
    """`LocalCompletionsAPI.parse_logprobs` of lm_eval 0.4.13, line for line."""
    res = []
    if not isinstance(outputs, list):
        outputs = [outputs]
    for out in outputs:
        for choice, ctxlen in zip(
            sorted(out["choices"], key=itemgetter("index")), ctxlens or [], strict=False
        ):
            assert ctxlen > 0, "Context length must be greater than 0"
            logprobs = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
            tokens_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
            top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
            is_greedy = True
            for tok, top in zip(tokens_logprobs, top_logprobs, strict=False):
                if tok != max(top.values()):
                    is_greedy = False
                    break
            res.append((logprobs, is_greedy))
    return res


def encode(client: httpx2.Client, text: str) -> list[int]:
    response = client.post("/v1/encode", json={"input": text, "add_bos": False})
    ids: list[int] = response.json()["input_ids"]
    return ids


@pytest.mark.parametrize("engine", [RAW, FAST], ids=["pytorch-logprobs-mode", "turbomind"])
def test_lm_eval_request_gets_no_logprobs(start_sim: StartSim, engine: tuple[str, ...]) -> None:
    node = start_sim(*engine)
    prompts = [CONTEXT + CONTINUATION, CONTEXT + " Lyon"]
    payload = lm_eval_payload(prompts)
    # As lm-eval posts it (requests.post(url, json=payload)) ...
    raw = httpx2.post(node.url + "/v1/completions", json=payload, timeout=10)
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert [c["logprobs"] for c in body["choices"]] == [None, None]
    assert body["usage"]["completion_tokens"] == 2  # max_tokens 1 each, no echo
    assert not any(c["text"].startswith("Question") for c in body["choices"])
    with pytest.raises(TypeError, match="not subscriptable"):
        parse_logprobs(body, ctxlens=[12, 12])  # what lm-eval meets against LMDeploy 0.18
    # ... and through the openai client, which reads the same answer.
    with openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0) as client:
        completion = client.completions.create(**payload)
    assert [c.logprobs for c in completion.choices] == [None, None]


def test_lm_eval_request_refused_without_logprobs_mode(start_sim: StartSim) -> None:
    node = start_sim(*FAST, "--backend", "pytorch")
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0)
    with client, pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**lm_eval_payload([CONTEXT]))
    assert refused.value.status_code == 400
    assert refused.value.body["message"] == (  # type: ignore[index]
        "logprobs(1) requested but not enabled logprobs_mode in engine configuration."
    )


def test_lm_eval_token_id_prompts_fail_preprocessing(start_sim: StartSim) -> None:
    """lm-eval's default sends token ids; LMDeploy 0.18's completions take text only."""
    node = start_sim(*RAW)
    with httpx2.Client(base_url=node.url, timeout=10) as client:
        ids = encode(client, CONTEXT + CONTINUATION)
        answer = client.post("/v1/completions", json=lm_eval_payload([ids]))
    assert answer.status_code == 400
    assert answer.json()["message"] == "Request preprocessing failed."


def echo_answer(client: httpx2.Client, ids: list[int]) -> dict[str, Any]:
    """The completion lm-eval expects (echo, max_tokens 1, logprobs 1), assembled from
    the two `/generate` calls LMDeploy 0.18 answers: the prompt's logprobs
    (`logprob_start_len` 0, `max_tokens` 0) and one greedy token with its logprob."""
    score = client.post(
        "/generate",
        json={
            "input_ids": ids,
            "return_logprob": True,
            "top_logprobs_num": 1,
            "max_tokens": 0,
            "logprob_start_len": 0,
        },
    ).json()["meta_info"]
    step = client.post(
        "/generate",
        json={"input_ids": ids, "return_logprob": True, "top_logprobs_num": 1, "max_tokens": 1},
    ).json()
    rows = score["input_token_logprobs"] + step["meta_info"]["output_token_logprobs"]
    tops = score["input_top_logprobs"] + step["meta_info"]["output_top_logprobs"]
    logprobs = {
        "tokens": [str(token) for token in [*ids, *step["output_ids"]]],
        "token_logprobs": [None, *(value for value, _ in rows)],  # no logprob for token 0
        "top_logprobs": [None, *({str(t): v for v, t in top} for top in tops)],
    }
    return {"choices": [{"index": 0, "text": step["text"], "logprobs": logprobs}]}


def test_loglikelihood_through_generate_on_a_fleet(
    start_sim: StartSim, serve_fleet: Callable[..., Served]
) -> None:
    nodes = [start_sim(*RAW), start_sim(*RAW)]
    _, proxy = serve_fleet([node.url for node in nodes])
    with httpx2.Client(base_url=proxy.url, timeout=10) as client:
        context, continuation = encode(client, CONTEXT), encode(client, CONTINUATION)
        ids = context + continuation
        answer = echo_answer(client, ids)
        ((loglikelihood, is_greedy),) = parse_logprobs(answer, ctxlens=[len(context)])
    logprobs = answer["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) + 1
    expected = logprobs["token_logprobs"][len(context) : len(ids)]
    assert loglikelihood == pytest.approx(sum(expected)) and loglikelihood < 0
    tops = logprobs["top_logprobs"][len(context) : len(ids)]
    assert is_greedy == all(v == max(top.values()) for v, top in zip(expected, tops, strict=True))
    # Every node of the fleet scores the same tokens alike: routing cannot change it.
    for node in nodes:
        with httpx2.Client(base_url=node.url, timeout=10) as client:
            assert parse_logprobs(echo_answer(client, ids), ctxlens=[len(context)]) == [
                (loglikelihood, is_greedy)
            ]
