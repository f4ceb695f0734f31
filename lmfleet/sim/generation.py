"""The inference routes: chat completions, completions and LMDeploy's /generate.

The output is decided up front (textgen); the cost model only paces when each
token is released. Fast mode skips the scheduler and every sleep. A request
aborted by /sleep or /abort_request ends normally (HTTP 200) with finish_reason
"abort", carrying the tokens produced so far.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from lmfleet.sim import asgi
from lmfleet.sim.engine import count_tokens
from lmfleet.sim.protocol import GenRequest, chat_usage, dumps, new_id, usage
from lmfleet.sim.runtime import NodeRuntime, Sequence
from lmfleet.sim.textgen import WORDS, Output, generate

_TOKEN_IDS = {f" {w}": 1000 + i for i, w in enumerate(WORDS)}
_EOS_ID = 2

ChunkBuilder = Callable[[int, str, "str | None", int], dict[str, Any]]


def _token_id(piece: str) -> int:
    return _TOKEN_IDS.get(piece, _EOS_ID)


async def _steps(
    rt: NodeRuntime, seq: Sequence, req: GenRequest, prompt_tokens: int, length: int
) -> AsyncGenerator[int, None]:
    """Yield decode step numbers as their tokens become due; stop early on abort.

    Each step counts its tokens in `generated_tokens` as it happens, as LMDeploy's
    `lmdeploy:generation_tokens_total` does (per engine iteration), so a reader of
    `/metrics` sees the node's decode pace, not lumps at each request's end.
    """
    slots = len(req.prompts) * req.n
    stats = rt.stats
    if rt.fast:
        for step in range(length):
            stats.generated_tokens += slots
            yield step
        return
    if not await rt.scheduler.admit(slots):
        seq.aborted = True
        return
    try:
        cached = sum(rt.prefix_cache.lookup_and_insert(p) for p in req.prompts)
        rt.stats.cached_tokens += cached
        await asyncio.sleep(rt.cost.prefill_seconds(prompt_tokens, cached))
        for step in range(length):
            if step:
                await asyncio.sleep(rt.cost.step_seconds(rt.scheduler.running))
            if seq.aborted:
                return
            stats.generated_tokens += slots
            yield step
    finally:
        rt.scheduler.release(slots)


async def _abort_on_disconnect(receive: asgi.Receive, seq: Sequence) -> None:
    """LMDeploy aborts a request whose client went away; so do we (timed mode only)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    seq.aborted = True


async def serve(
    rt: NodeRuntime,
    req: GenRequest,
    send: asgi.Send,
    receive: asgi.Receive,
    extra: dict[str, Any] | None = None,
) -> None:
    """Run one inference request to the end (or to its abort) and answer it.

    `extra`: fields added to a non-streamed answer (a DistServe prefill's cache ids).
    """
    options = rt.options
    seed = options.seed if req.seed is None else req.seed
    outputs = [
        generate(
            prompt,
            seed=seed,
            index=j,
            max_tokens=req.max_tokens,
            output_tokens=options.output_tokens,
            output_tokens_max=options.output_tokens_max,
            stop=req.stop,
            ignore_eos=req.ignore_eos,
        )
        for prompt in req.prompts
        for j in range(req.n)
    ]
    prompt_tokens = sum(count_tokens(p) for p in req.prompts)
    length = max(o.tokens for o in outputs)
    seq = rt.begin(req.session_id)
    # Fast mode never waits, so a disconnect cannot matter there: skip the task.
    watcher = None if rt.fast else asyncio.create_task(_abort_on_disconnect(receive, seq))
    done = 0
    try:
        if req.stream:
            done = await _stream(rt, seq, req, outputs, prompt_tokens, length, send)
        else:
            async with aclosing(_steps(rt, seq, req, prompt_tokens, length)) as steps:
                async for step in steps:
                    done = step + 1
            answer = _complete(rt, req, outputs, prompt_tokens, done)
            await asgi.send_json(send, 200, {**answer, **extra} if extra else answer)
    finally:
        if watcher is not None:
            watcher.cancel()
        completion_tokens = sum(min(o.tokens, done) for o in outputs)
        rt.end(seq, prompt_tokens, completion_tokens, aborted=done < length)


def _finals(outputs: list[Output], done: int) -> list[tuple[str, str, int]]:
    """(text, finish_reason, tokens) per choice after `done` steps (abort if cut short)."""
    result = []
    for out in outputs:
        if done >= out.tokens:
            result.append((out.text, out.finish_reason, out.tokens))
        else:
            result.append(("".join(out.pieces[:done]), "abort", done))
    return result


def _complete(
    rt: NodeRuntime, req: GenRequest, outputs: list[Output], prompt_tokens: int, done: int
) -> dict[str, Any]:
    finals = _finals(outputs, done)
    completion_tokens = sum(tokens for _, _, tokens in finals)
    if req.kind == "generate":
        text, reason, tokens = finals[0]
        ids = [_token_id(p) for p in outputs[0].pieces[:tokens]]
        return {"text": text, "output_ids": ids, "meta_info": _meta(prompt_tokens, tokens, reason)}
    if req.kind == "chat":
        choices: list[dict[str, Any]] = [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "reasoning_content": None,
                    "tool_calls": None,
                },
                "logprobs": None,
                "output_token_logprobs": None,
                "finish_reason": reason,
                "output_ids": None,
                "routed_experts": None,
            }
            for i, (text, reason, _) in enumerate(finals)
        ]
        return {
            "id": new_id("chatcmpl"),
            "object": "chat.completion",
            "created": rt.created,
            "model": req.model,
            "choices": choices,
            "usage": chat_usage(prompt_tokens, completion_tokens),
            "service_tier": None,
        }
    choices = [
        {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
        for i, (text, reason, _) in enumerate(finals)
    ]
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": rt.created,
        "model": req.model,
        "choices": choices,
        "usage": {
            **usage(prompt_tokens, completion_tokens),
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        },
    }


def _meta(prompt_tokens: int, completion_tokens: int, reason: str | None) -> dict[str, Any]:
    """GenerateReqMetaOutput of LMDeploy's /generate."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "finish_reason": {"type": reason} if reason else None,
        "output_token_logprobs": None,
        "input_token_logprobs": None,
        "output_top_logprobs": None,
        "input_top_logprobs": None,
        "routed_experts": None,
    }


def _chunk_builder(rt: NodeRuntime, req: GenRequest, prompt_tokens: int) -> ChunkBuilder:
    """A function (choice, piece, finish_reason, tokens so far) -> one SSE payload."""
    rid = new_id("chatcmpl" if req.kind == "chat" else "cmpl")
    head: dict[str, Any] = {"id": rid, "created": rt.created, "model": req.model}
    if req.kind == "chat":
        head["object"] = "chat.completion.chunk"
    else:
        head["object"] = "text_completion"
    if req.include_usage:
        head["usage"] = None

    # Chunks are dumped with exclude_none: no finish_reason key until there is one.
    def chat(index: int, piece: str, finish: str | None, _: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "delta": {"role": "assistant", "content": piece}}
        if finish is not None:
            choice["finish_reason"] = finish
        return {**head, "choices": [choice]}

    def completion(index: int, piece: str, finish: str | None, _: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "text": piece}
        if finish is not None:
            choice["finish_reason"] = finish
        return {**head, "choices": [choice]}

    def gen(index: int, piece: str, finish: str | None, tokens: int) -> dict[str, Any]:
        ids = [_token_id(piece)] if piece or finish != "abort" else []
        return {"text": piece, "output_ids": ids, "meta_info": _meta(prompt_tokens, tokens, finish)}

    return {"chat": chat, "completion": completion, "generate": gen}[req.kind]


async def _stream(
    rt: NodeRuntime,
    seq: Sequence,
    req: GenRequest,
    outputs: list[Output],
    prompt_tokens: int,
    length: int,
    send: asgi.Send,
) -> int:
    """Stream one SSE event per token per choice; returns the steps completed."""
    build = _chunk_builder(rt, req, prompt_tokens)
    drop_after = rt.faults.drop_stream_after
    sent = 0
    done = 0
    await asgi.start_stream(send)

    async def emit(payload: dict[str, Any]) -> None:
        nonlocal sent
        if drop_after is not None and sent >= drop_after:
            raise asgi.StreamDropped(f"dropped after {sent} chunks (fault injection)")
        await asgi.send_event(send, b"data: " + dumps(payload) + b"\n\n")
        if not sent:
            rt.first_chunk_sent(seq)
        sent += 1

    async with aclosing(_steps(rt, seq, req, prompt_tokens, length)) as steps:
        async for step in steps:
            done = step + 1
            for index, out in enumerate(outputs):
                if step < out.tokens:
                    last = step == out.tokens - 1
                    finish = out.finish_reason if last else None
                    await emit(build(index, out.pieces[step], finish, done))
    for index, out in enumerate(outputs):
        if done < out.tokens:  # cut short by an abort: one last chunk says so
            await emit(build(index, "", "abort", done))
    if req.include_usage and req.kind != "generate":
        completion_tokens = sum(min(o.tokens, done) for o in outputs)
        head = build(0, "", None, done)
        totals = (
            chat_usage(prompt_tokens, completion_tokens)
            if req.kind == "chat"
            else usage(prompt_tokens, completion_tokens)
        )
        totals.pop("completion_tokens_details", None)  # None: dropped by exclude_none
        head.update(choices=[], usage=totals)
        await emit(head)
    await asgi.end_stream(send)
    return done
