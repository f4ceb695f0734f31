"""Every route and case the simulator implements, sent to the real LMDeploy and to the sim.

Status codes, the Content-Type and the JSON shape (keys, value types) must match;
error messages too. Accepted differences live in differences.py only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx2
import pytest
from conformance.exchange import Case, compare, send

CHAT = {"model": "$MODEL", "messages": [{"role": "user", "content": "hello world"}]}
COMPLETION = {"model": "$MODEL", "prompt": "say hello"}
GENERATE = {"prompt": "say hello"}
# lm-eval's loglikelihood request (`local-completions`, lm_eval/models/openai_completions.py).
LM_EVAL = {
    **COMPLETION,
    "temperature": 0,
    "max_tokens": 1,
    "logprobs": 1,
    "seed": 1234,
    "echo": True,
}
# Weight-update bodies (LMDeploy's UpdateParamsRequest and the NCCL group requests).
PARAMS = {"serialized_named_tensors": "AAAA", "load_format": "flattened_bucket"}
GROUP = {
    "master_address": "127.0.0.1",
    "master_port": 29500,
    "rank_offset": 1,
    "world_size": 2,
    "group_name": "g",
}
BUCKET = {"names": ["w"], "dtypes": ["bfloat16"], "shapes": [[2, 2]], "group_name": "g"}

CASES = [
    # health, models, auth
    Case("health", "GET", "/health", auth=False, json_type=False),
    Case("health-with-key", "GET", "/health", json_type=False),
    Case("models", "GET", "/v1/models", json_type=False),
    Case("models-no-key", "GET", "/v1/models", auth=False, json_type=False),
    Case(
        "models-bad-key", "GET", "/v1/models", auth=False, headers={"authorization": "Bearer nope"}
    ),
    Case("is-sleeping", "GET", "/is_sleeping", json_type=False),
    Case("is-sleeping-no-key", "GET", "/is_sleeping", auth=False, json_type=False),
    Case("sleep-no-key", "POST", "/sleep?level=1", auth=False),
    Case("wakeup-no-key", "POST", "/wakeup", auth=False),
    Case("chat-no-key", "POST", "/v1/chat/completions", body=CHAT, auth=False),
    Case("metrics-no-key", "GET", "/metrics", auth=False, json_type=False),
    Case("unknown-path-no-key", "GET", "/nope", auth=False, json_type=False),
    Case("nodes-no-key", "GET", "/nodes/status", auth=False, json_type=False),
    Case("docs-no-key", "GET", "/docs", auth=False, json_type=False),
    # the Content-Type rule and level checks (never reaching a sleep)
    Case("sleep-no-json", "POST", "/sleep?level=1", json_type=False),
    Case("wakeup-no-json", "POST", "/wakeup", json_type=False),
    Case(
        "sleep-text-plain",
        "POST",
        "/sleep",
        json_type=False,
        headers={"content-type": "text/plain"},
    ),
    Case("sleep-level-3", "POST", "/sleep?level=3"),
    Case("sleep-level-x", "POST", "/sleep?level=x"),
    Case("wakeup-awake", "POST", "/wakeup"),
    Case("chat-no-json", "POST", "/v1/chat/completions", body=CHAT, json_type=False),
    Case("completions-no-json", "POST", "/v1/completions", body=COMPLETION, json_type=False),
    Case("generate-no-json", "POST", "/generate", body={"prompt": "hi"}, json_type=False),
    Case("encode-no-json", "POST", "/v1/encode", body={"input": "hi"}, json_type=False),
    # chat completions
    Case("chat", "POST", "/v1/chat/completions", body=CHAT),
    Case("chat-length", "POST", "/v1/chat/completions", body={**CHAT, "max_tokens": 2}),
    Case(
        "chat-max-completion-tokens",
        "POST",
        "/v1/chat/completions",
        body={**CHAT, "max_completion_tokens": 2},
    ),
    Case("chat-malformed", "POST", "/v1/chat/completions", raw=b'{"model": '),
    Case("chat-not-object", "POST", "/v1/chat/completions", raw=b"[1, 2]"),
    Case("chat-empty-body", "POST", "/v1/chat/completions", raw=b""),
    Case("chat-unknown-model", "POST", "/v1/chat/completions", body={**CHAT, "model": "nope"}),
    Case("chat-no-messages", "POST", "/v1/chat/completions", body={"model": "$MODEL"}),
    Case("chat-no-model", "POST", "/v1/chat/completions", body={"messages": CHAT["messages"]}),
    Case(
        "chat-bad-max-tokens-type", "POST", "/v1/chat/completions", body={**CHAT, "max_tokens": "x"}
    ),
    Case(
        "chat-bad-temperature-type",
        "POST",
        "/v1/chat/completions",
        body={**CHAT, "temperature": "hot"},
    ),
    Case("chat-n-0", "POST", "/v1/chat/completions", body={**CHAT, "n": 0}),
    Case("chat-top-p-2", "POST", "/v1/chat/completions", body={**CHAT, "top_p": 2}),
    Case("chat-top-k-neg", "POST", "/v1/chat/completions", body={**CHAT, "top_k": -1}),
    Case("chat-temperature-5", "POST", "/v1/chat/completions", body={**CHAT, "temperature": 5}),
    Case("chat-max-tokens-0", "POST", "/v1/chat/completions", body={**CHAT, "max_tokens": 0}),
    Case("chat-max-tokens-neg", "POST", "/v1/chat/completions", body={**CHAT, "max_tokens": -1}),
    Case("chat-stop", "POST", "/v1/chat/completions", body={**CHAT, "stop": ["zzz"]}),
    Case("chat-bad-stop", "POST", "/v1/chat/completions", body={**CHAT, "stop": 5}),
    Case("chat-stream", "POST", "/v1/chat/completions", body={**CHAT, "stream": True}, stream=True),
    Case(
        "chat-stream-usage",
        "POST",
        "/v1/chat/completions",
        body={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
        stream=True,
    ),
    Case(
        "chat-stream-length",
        "POST",
        "/v1/chat/completions",
        body={**CHAT, "stream": True, "max_tokens": 3},
        stream=True,
    ),
    # completions
    Case("completions", "POST", "/v1/completions", body=COMPLETION),
    Case("completions-list", "POST", "/v1/completions", body={**COMPLETION, "prompt": ["a", "b"]}),
    # prompt is `str | list[Any]`: token ids (lm-eval's default) fail in preprocessing
    Case(
        "completions-token-ids", "POST", "/v1/completions", body={**COMPLETION, "prompt": [[5, 6]]}
    ),
    Case("completions-flat-ids", "POST", "/v1/completions", body={**COMPLETION, "prompt": [5, 6]}),
    Case("completions-mixed", "POST", "/v1/completions", body={**COMPLETION, "prompt": ["a", 5]}),
    Case("completions-empty-list", "POST", "/v1/completions", body={**COMPLETION, "prompt": []}),
    Case(
        "completions-empty-list-stream",
        "POST",
        "/v1/completions",
        body={
            **COMPLETION,
            "prompt": [],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        stream=True,
    ),
    Case("completions-unknown-model", "POST", "/v1/completions", body={**COMPLETION, "model": "x"}),
    Case("completions-no-prompt", "POST", "/v1/completions", body={"model": "$MODEL"}),
    Case("completions-malformed", "POST", "/v1/completions", raw=b"{nope"),
    Case(
        "completions-stream-usage",
        "POST",
        "/v1/completions",
        body={**COMPLETION, "stream": True, "stream_options": {"include_usage": True}},
        stream=True,
    ),
    # logprobs on the PyTorch engine without --logprobs-mode: refused (400), except
    # `logprobs: 0`; with the mode: test_logprobs.py
    Case("completions-lm-eval", "POST", "/v1/completions", body=LM_EVAL),
    Case("completions-logprobs-0", "POST", "/v1/completions", body={**LM_EVAL, "logprobs": 0}),
    Case(
        "completions-stream-logprobs-0",
        "POST",
        "/v1/completions",
        body={**COMPLETION, "logprobs": 0, "max_tokens": 2, "stream": True},
        stream=True,
    ),
    Case(
        "completions-max-tokens-0", "POST", "/v1/completions", body={**COMPLETION, "max_tokens": 0}
    ),
    Case(
        "completions-max-tokens-neg",
        "POST",
        "/v1/completions",
        body={**COMPLETION, "max_tokens": -1},
    ),
    Case("chat-logprobs", "POST", "/v1/chat/completions", body={**CHAT, "logprobs": True}),
    Case(
        "chat-logprobs-top",
        "POST",
        "/v1/chat/completions",
        body={**CHAT, "logprobs": True, "top_logprobs": 2},
    ),
    Case(
        "chat-top-logprobs-only", "POST", "/v1/chat/completions", body={**CHAT, "top_logprobs": 2}
    ),
    Case(
        "chat-return-logprob", "POST", "/v1/chat/completions", body={**CHAT, "return_logprob": True}
    ),
    Case(
        "chat-max-completion-tokens-0",
        "POST",
        "/v1/chat/completions",
        body={**CHAT, "max_completion_tokens": 0},
    ),
    Case("generate-return-logprob", "POST", "/generate", body={**GENERATE, "return_logprob": True}),
    Case("generate-top-no-return", "POST", "/generate", body={**GENERATE, "top_logprobs_num": 2}),
    Case(
        "generate-score",
        "POST",
        "/generate",
        body={**GENERATE, "return_logprob": True, "max_tokens": 0, "logprob_start_len": 0},
    ),
    Case(
        "generate-score-no-return",
        "POST",
        "/generate",
        body={**GENERATE, "max_tokens": 0, "logprob_start_len": 0},
    ),
    Case("generate-max-tokens-0", "POST", "/generate", body={**GENERATE, "max_tokens": 0}),
    Case("generate-max-tokens-neg", "POST", "/generate", body={**GENERATE, "max_tokens": -1}),
    # LMDeploy's /generate
    Case("generate", "POST", "/generate", body={"prompt": "say hello"}),
    Case("generate-ids", "POST", "/generate", body={"input_ids": [5, 6, 7]}),
    Case("generate-both", "POST", "/generate", body={"prompt": "a", "input_ids": [1]}),
    Case("generate-neither", "POST", "/generate", body={}),
    Case("generate-empty-prompt", "POST", "/generate", body={"prompt": ""}),
    Case(
        "generate-stream",
        "POST",
        "/generate",
        body={"prompt": "say hello", "stream": True},
        stream=True,
    ),
    # auxiliary
    Case("encode", "POST", "/v1/encode", body={"input": "hello world"}),
    Case("encode-list", "POST", "/v1/encode", body={"input": ["hello", "world"], "add_bos": False}),
    Case("encode-bad", "POST", "/v1/encode", body={"input": 5}),
    Case("pooling", "POST", "/pooling", body={"model": "$MODEL", "input": "hello"}),
    Case("pooling-empty", "POST", "/pooling", body={"model": "$MODEL", "input": []}),
    Case("embeddings", "POST", "/v1/embeddings", body={"model": "$MODEL", "input": "hello"}),
    Case("embeddings-no-body", "POST", "/v1/embeddings", raw=b"{}"),
    Case("abort-request", "POST", "/abort_request", body={"session_id": 5}),
    Case("terminate", "GET", "/terminate", json_type=False),
    # weight updates: both sides are PyTorch with the default (uni) executor, which
    # cannot load pushed weights (500) and has no NCCL group routes (500)
    Case("update-weights-bad", "POST", "/update_weights", body={}),
    Case("update-weights-no-json", "POST", "/update_weights", body=PARAMS, json_type=False),
    Case(
        "update-weights-text-plain",
        "POST",
        "/update_weights",
        body=PARAMS,
        json_type=False,
        headers={"content-type": "text/plain"},
    ),
    Case("update-weights-malformed", "POST", "/update_weights", raw=b'{"serialized'),
    Case("update-weights-not-object", "POST", "/update_weights", raw=b'"x"'),
    Case(
        "update-weights-bad-payload",
        "POST",
        "/update_weights",
        body={"serialized_named_tensors": 5},
    ),
    Case(
        "update-weights-bad-list",
        "POST",
        "/update_weights",
        body={"serialized_named_tensors": ["a", 5]},
    ),
    Case(
        "update-weights-bad-finished",
        "POST",
        "/update_weights",
        body={**PARAMS, "finished": "maybe"},
    ),
    Case("update-weights", "POST", "/update_weights", body=PARAMS),
    Case("update-weights-finished", "POST", "/update_weights", body={**PARAMS, "finished": True}),
    Case("update-weights-dict", "POST", "/update_weights", body={"serialized_named_tensors": {}}),
    Case("ipc-status", "GET", "/update_weights_from_ipc", json_type=False),
    Case(
        "ipc-no-json", "POST", "/update_weights_from_ipc", body={"zmq_handles": {}}, json_type=False
    ),
    Case("ipc-bad", "POST", "/update_weights_from_ipc", body={"zmq_handles": {"a": 1}}),
    Case("ipc", "POST", "/update_weights_from_ipc", body={"zmq_handles": {"GPU-0": "ipc://x"}}),
    Case("init-group-no-json", "POST", "/init_weights_update_group", body=GROUP, json_type=False),
    Case("init-group-bad", "POST", "/init_weights_update_group", body={"group_name": "g"}),
    Case(
        "init-group-bad-port",
        "POST",
        "/init_weights_update_group",
        body={**GROUP, "master_port": "http"},
    ),
    Case("init-group", "POST", "/init_weights_update_group", body=GROUP),
    Case("bucket-bad", "POST", "/update_weights_from_distributed", body={"group_name": "g"}),
    Case(
        "bucket-bad-shapes",
        "POST",
        "/update_weights_from_distributed",
        body={**BUCKET, "shapes": [2, 2]},
    ),
    Case("bucket", "POST", "/update_weights_from_distributed", body={**BUCKET, "finished": True}),
    Case("destroy-group-bad", "POST", "/destroy_weights_update_group", body={}),
    Case("destroy-group", "POST", "/destroy_weights_update_group", body={"group_name": "g"}),
    Case("metrics", "GET", "/metrics", json_type=False),
    Case("unknown-path", "GET", "/nope", json_type=False),
    Case("wrong-method", "GET", "/v1/chat/completions", json_type=False),
]


@pytest.fixture
def client() -> Iterator[httpx2.Client]:
    # One client per case: LMDeploy drops the keep-alive connection after a 500.
    with httpx2.Client(timeout=30) as c:
        yield c


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_answer(case: Case, pair, client: httpx2.Client) -> None:
    real = send(client, pair.real.url, case, pair.model)
    sim = send(client, pair.sim.url, case, pair.model)
    problems = compare(case, real, sim)
    if case.stream and real.media_type == sim.media_type == "text/event-stream":
        problems += stream_problems(case, real.body, sim.body)
    assert not problems, "\n".join(problems) + f"\nreal: {real.text[:600]}\nsim:  {sim.text[:600]}"


def stream_problems(case: Case, real: list, sim: list) -> list[str]:
    """SSE: both end with [DONE]; first chunk, last content chunk and usage chunk alike."""
    from conformance.differences import unexplained
    from conformance.shapes import shape_diff

    out: list[str] = []
    for side, events in (("real", real), ("sim", sim)):
        if not events or events[-1] != "[DONE]":
            out.append(f"stream: {side} does not end with [DONE]")
    real_chunks = [e for e in real if e != "[DONE]"]
    sim_chunks = [e for e in sim if e != "[DONE]"]
    for label, pick in (
        ("first", lambda cs: cs[0]),
        ("finish", lambda cs: next(c for c in cs if _finish(c))),
        ("last", lambda cs: cs[-1]),
    ):
        picked = []
        for chunks in (real_chunks, sim_chunks):
            with contextlib.suppress(IndexError, StopIteration):
                picked.append(pick(chunks))
        if len(picked) == 1:
            out.append(f"stream.{label}: missing on one side")
        elif picked:
            out += [f"{label}-chunk {d}" for d in shape_diff(*picked)]
    real_reasons = [_finish(c) for c in real_chunks if _finish(c)]
    sim_reasons = [_finish(c) for c in sim_chunks if _finish(c)]
    if real_reasons != sim_reasons:
        out.append(f"stream.finish_reason: real {real_reasons}, sim {sim_reasons}")
    return unexplained(case.name, out)


def _finish(chunk: dict) -> str | None:
    if "choices" in chunk:
        return next(
            (c.get("finish_reason") for c in chunk["choices"] if c.get("finish_reason")), None
        )
    meta = chunk.get("meta_info") or {}
    reason = meta.get("finish_reason")
    return reason.get("type") if isinstance(reason, dict) else None
