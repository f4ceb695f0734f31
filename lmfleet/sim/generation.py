"""The inference routes: chat completions, completions and LMDeploy's /generate.

The output is decided up front (textgen); the cost model only paces when each
token is released. Fast mode skips the scheduler and every sleep. A request
aborted by /sleep or /abort_request ends normally (HTTP 200) with finish_reason
"abort", carrying the tokens produced so far.

Logprobs (logprobs.py) follow LMDeploy 0.18: chat `choices[].logprobs.content` and
`output_token_logprobs`; `/generate`'s `meta_info` lists, including the prompt's
under `logprob_start_len`; `/v1/completions` always answers `logprobs: null` (its
stream breaks off: 0.18 raises "logprobs is removed"). A stream that carries
logprobs ends each choice with a chunk of its own (empty text, no logprobs), as
LMDeploy's final engine output does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from lmfleet.sim import asgi
from lmfleet.sim import logprobs as lp
from lmfleet.sim.engine import count_tokens
from lmfleet.sim.node import NodeRuntime, Sequence
from lmfleet.sim.protocol import GenRequest, chat_usage, dumps, new_id, usage
from lmfleet.sim.textgen import WORDS, Output, generate, prompt_hash

_TOKEN_IDS = {f" {w}": lp.FIRST_WORD_ID + i for i, w in enumerate(WORDS)}
_EOS_ID = lp.EOS_ID
# LMDeploy 0.18's completions stream raises this on the first output with logprobs.
LOGPROBS_REMOVED = "logprobs is removed"


class ChunkBuilder(Protocol):
    """(choice, piece, finish_reason, tokens so far, step of a token chunk) -> one SSE payload."""

    def __call__(
        self,
        index: int,
        piece: str,
        finish: str | None,
        tokens: int,
        step: int | None = None,
        /,
    ) -> dict[str, Any]: ...


def _token_id(piece: str) -> int:
    return _TOKEN_IDS.get(piece, _EOS_ID)


@dataclass(slots=True)
class TokenLogprobs:
    """Every choice's token ids and engine rows, computed up front like the text."""

    ids: list[list[int]]
    rows: list[list[lp.Row]]
    # /generate with logprob_start_len: the scored prompt tokens and their rows.
    input_ids: list[int] | None = None
    input_rows: list[lp.Row] | None = None

    @staticmethod
    def build(
        req: GenRequest, outputs: list[Output], seed: int, logits: bool
    ) -> TokenLogprobs | None:
        if not req.logprobs or req.kind == "completion":  # 0.18 drops completions' rows
            return None
        states = [prompt_hash(p, seed, j) for p in req.prompts for j in range(req.n)]
        ids = [[_token_id(piece) for piece in out.pieces] for out in outputs]
        rows = [
            lp.output_rows(state, choice, req.logprobs, logits)
            for state, choice in zip(states, ids, strict=True)
        ]
        result = TokenLogprobs(ids, rows)
        if req.logprob_start_len >= 0:
            prompt = req.input_ids if req.input_ids is not None else lp.text_ids(req.prompts[0])
            result.input_ids = prompt[req.logprob_start_len + 1 :]
            result.input_rows = lp.input_rows(prompt, req.logprob_start_len, req.logprobs, logits)
        return result

    def chat(self, req: GenRequest, index: int, start: int, stop: int) -> dict[str, Any]:
        """Chat's `logprobs` and `output_token_logprobs` for tokens [start, stop)."""
        ids, rows = self.ids[index][start:stop], self.rows[index][start:stop]
        return {
            "logprobs": {"content": lp.chat_content(ids, rows)}
            if req.chat_logprobs and ids
            else None,
            "output_token_logprobs": lp.token_pairs(ids, rows)
            if req.return_logprob and ids
            else None,
        }

    def generate(self, req: GenRequest, start: int, stop: int) -> dict[str, Any]:
        """`/generate`'s four meta_info lists for output tokens [start, stop) (and the prompt's)."""
        ids, rows = self.ids[0][start:stop], self.rows[0][start:stop]
        top = req.top_logprobs_num
        lists: dict[str, Any] = {
            "output_token_logprobs": lp.token_pairs(ids, rows) if ids else None,
            "input_token_logprobs": None,
            "output_top_logprobs": lp.top_pairs(ids, rows, top) if top and ids else None,
            "input_top_logprobs": None,
        }
        if self.input_ids is not None and self.input_rows is not None:
            pairs = lp.token_pairs(self.input_ids, self.input_rows)
            lists["input_token_logprobs"] = pairs or None
            if top:
                tops = lp.top_pairs(self.input_ids, self.input_rows, top)
                lists["input_top_logprobs"] = tops or None
        return lists


def _prompt_tokens(req: GenRequest) -> int:
    if req.input_ids is not None:
        return len(req.input_ids)
    return sum(count_tokens(p) for p in req.prompts)


async def _steps(
    rt: NodeRuntime, seq: Sequence, req: GenRequest, prompt_tokens: int, length: int
) -> AsyncGenerator[int, None]:
    """Yield decode step numbers as their tokens become due; stop early on abort.

    Each step counts its tokens in `generated_tokens` as it happens, as LMDeploy's
    `lmdeploy:generation_tokens_total` does (per engine iteration), so a reader of
    `/metrics` sees the node's decode pace, not lumps at each request's end.
    """
    slots = len(req.prompts) * req.n
    if not slots:  # `prompt: []`: LMDeploy starts no generator at all
        return
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
    seed = weights_seed(options.seed if req.seed is None else req.seed, rt.weights.last_digest)
    resumed = req.resumed
    outputs = [
        resume(
            generate(
                prompt,
                seed=seed,
                index=j,
                max_tokens=None if req.max_tokens is None else req.max_tokens + resumed,
                output_tokens=options.output_tokens,
                output_tokens_max=options.output_tokens_max,
                stop=req.stop,
                ignore_eos=req.ignore_eos,
            ),
            resumed,
        )
        for prompt in req.prompts
        for j in range(req.n)
    ]
    token_logprobs = TokenLogprobs.build(req, outputs, seed, options.logprobs_mode == "raw_logits")
    prompt_tokens = _prompt_tokens(req)
    length = max((o.tokens for o in outputs), default=0)
    seq = rt.begin(req.session_id)
    # Fast mode never waits, so a disconnect cannot matter there: skip the task.
    watcher = None if rt.fast else asyncio.create_task(_abort_on_disconnect(receive, seq))
    done = 0
    try:
        if req.stream:
            done = await _stream(rt, seq, req, outputs, prompt_tokens, length, send, token_logprobs)
        else:
            async with aclosing(_steps(rt, seq, req, prompt_tokens, length)) as steps:
                async for step in steps:
                    done = step + 1
            answer = _complete(rt, req, outputs, prompt_tokens, done, token_logprobs)
            await asgi.send_json(send, 200, {**answer, **extra} if extra else answer)
    finally:
        if watcher is not None:
            watcher.cancel()
        completion_tokens = sum(min(o.tokens, done) for o in outputs)
        rt.end(seq, prompt_tokens, completion_tokens, aborted=done < length)


def weights_seed(seed: int, digest: str | None) -> int:
    """The generation seed under the loaded weights: the initial weights keep `seed`;
    pushed weights (their digest, sim/weights.py) change every output, and the same
    tensors pushed again give the same outputs, as a real model would."""
    return seed if digest is None else seed ^ (int(digest, 16) << 20)


def resume(full: Output, resumed: int) -> Output:
    """The rest of `full` after the `resumed` tokens a continuation already holds."""
    if not resumed:
        return full
    return Output(full.pieces[resumed:], full.finish_reason)


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
    rt: NodeRuntime,
    req: GenRequest,
    outputs: list[Output],
    prompt_tokens: int,
    done: int,
    token_logprobs: TokenLogprobs | None = None,
) -> dict[str, Any]:
    finals = _finals(outputs, done)
    completion_tokens = sum(tokens for _, _, tokens in finals)
    if req.kind == "generate":
        text, reason, tokens = finals[0]
        ids = [_token_id(p) for p in outputs[0].pieces[:tokens]]
        meta = _meta(prompt_tokens, tokens, reason)
        if token_logprobs is not None:
            meta.update(token_logprobs.generate(req, 0, tokens))
        return {"text": text, "output_ids": ids, "meta_info": meta}
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
                **(token_logprobs.chat(req, i, 0, tokens) if token_logprobs else {}),
                "finish_reason": reason,
                "output_ids": None,
                "routed_experts": None,
            }
            for i, (text, reason, tokens) in enumerate(finals)
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


def _chunk_builder(
    rt: NodeRuntime,
    req: GenRequest,
    prompt_tokens: int,
    token_logprobs: TokenLogprobs | None = None,
) -> ChunkBuilder:
    """A function (choice, piece, finish_reason, tokens so far, step) -> one SSE payload.

    `step` is set on a token's own chunk (its logprobs go there), None on the
    finishing chunk of a choice, an abort chunk and the usage chunk.
    """
    rid = new_id("chatcmpl" if req.kind == "chat" else "cmpl")
    head: dict[str, Any] = {"id": rid, "created": rt.created, "model": req.model}
    if req.kind == "chat":
        head["object"] = "chat.completion.chunk"
    else:
        head["object"] = "text_completion"
    if req.include_usage:
        head["usage"] = None

    # Chunks are dumped with exclude_none: no finish_reason key until there is one,
    # and logprobs keys only on the chunks that carry some.
    def chat(
        index: int, piece: str, finish: str | None, _: int, step: int | None = None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "delta": {"role": "assistant", "content": piece}}
        if token_logprobs is not None and step is not None:
            lists = token_logprobs.chat(req, index, step, step + 1)
            choice.update((k, v) for k, v in lists.items() if v is not None)
        if finish is not None:
            choice["finish_reason"] = finish
        return {**head, "choices": [choice]}

    def completion(
        index: int, piece: str, finish: str | None, _: int, step: int | None = None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "text": piece}
        if finish is not None:
            choice["finish_reason"] = finish
        return {**head, "choices": [choice]}

    def gen(
        index: int, piece: str, finish: str | None, tokens: int, step: int | None = None
    ) -> dict[str, Any]:
        ids = [_token_id(piece)] if step is not None else []
        meta = _meta(prompt_tokens, tokens, finish)
        scored = req.logprob_start_len >= 0 and finish not in (None, "abort")
        if token_logprobs is not None and (step is not None or scored):
            meta.update(token_logprobs.generate(req, step or 0, 0 if step is None else step + 1))
        return {"text": piece, "output_ids": ids, "meta_info": meta}

    builders: dict[str, ChunkBuilder] = {"chat": chat, "completion": completion, "generate": gen}
    return builders[req.kind]


async def _stream(
    rt: NodeRuntime,
    seq: Sequence,
    req: GenRequest,
    outputs: list[Output],
    prompt_tokens: int,
    length: int,
    send: asgi.Send,
    token_logprobs: TokenLogprobs | None = None,
) -> int:
    """Stream one SSE event per token per choice; returns the steps completed."""
    build = _chunk_builder(rt, req, prompt_tokens, token_logprobs)
    # LMDeploy's last engine output of a choice is a chunk of its own (empty text, no
    # logprobs); the sim folds it into the last token's chunk unless logprobs are on.
    split_finish = token_logprobs is not None
    drop_after = rt.faults.drop_stream_after
    stall_after = rt.faults.stall_stream_after
    sent = 0
    done = 0
    await asgi.start_stream(send)

    async def emit(payload: dict[str, Any]) -> None:
        nonlocal sent
        if drop_after is not None and sent >= drop_after:
            raise asgi.StreamDropped(f"dropped after {sent} chunks (fault injection)")
        if stall_after is not None and sent >= stall_after:
            while not seq.aborted:  # silent until the client goes (fault injection)
                await asyncio.sleep(0.05)
            raise asgi.StreamDropped(f"stalled after {sent} chunks (fault injection)")
        await asgi.send_event(send, b"data: " + dumps(payload) + b"\n\n")
        if not sent:
            rt.first_chunk_sent(seq)
        sent += 1

    async with aclosing(_steps(rt, seq, req, prompt_tokens, length)) as steps:
        async for step in steps:
            done = step + 1
            if req.kind == "completion" and req.logprobs > 0:
                # 0.18's completion_stream_generator raises ValueError on the first
                # output carrying logprobs: the 200 head is out, the body breaks off.
                raise asgi.StreamDropped(LOGPROBS_REMOVED)
            for index, out in enumerate(outputs):
                if step < out.tokens:
                    last = step == out.tokens - 1
                    finish = out.finish_reason if last and not split_finish else None
                    await emit(build(index, out.pieces[step], finish, done, step))
                    if last and split_finish:
                        await emit(build(index, "", out.finish_reason, done))
    if req.logprob_start_len >= 0:
        # /generate scoring a prompt: no tokens, one chunk with the prompt's logprobs.
        await emit(build(0, "", "abort" if seq.aborted else outputs[0].finish_reason, 0))
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
