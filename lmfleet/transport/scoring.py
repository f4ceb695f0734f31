"""Prompt scoring over LMDeploy 0.18: `/v1/completions` with `echo` and `logprobs`,
answered from the node's `/generate`.

lm-evaluation-harness scores a (context, continuation) pair with one completions
request that echoes the prompt with each token's logprob (`echo: true`,
`logprobs: 1`, `max_tokens: 1`; its `local-completions` model). LMDeploy 0.18's
completions route cannot answer it: it ignores `echo`, answers `logprobs: null`
and refuses token-id prompts (read from its source and checked against the real
server: tests/conformance/test_logprobs.py). Its `/generate` can: `return_logprob`
with `logprob_start_len: 0` and `max_tokens: 0` scores every prompt token (the
PyTorch engine with `--logprobs-mode`). So for this one request shape the fleet
does not forward the request as it came: on the node it leased it asks
`/generate` twice per prompt (the prompt's logprobs, then the tokens to generate
with theirs) and answers the completion an OpenAI server would. A node that cannot
score (no `--logprobs-mode`) answers its own error, passed on unchanged; a node
that fails is failed over, as for any request, before anything reaches the caller.
A vLLM or SGLang node gets the request as it came (their completions route scores
an echoed prompt itself).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx2

from lmfleet.node.outliers import Outcome, outcome_of_status
from lmfleet.node.state import NodeState
from lmfleet.routing.base import RequestInfo
from lmfleet.transport import tracing
from lmfleet.transport.plan import SERVED_VERSION_HEADER, Attempts, RequestPlan, Retry, Routing
from lmfleet.transport.steps import Call, Steps
from lmfleet.transport.streams import Accounting

COMPLETIONS = "/v1/completions"
GENERATE = "/generate"

SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty", "ignore_eos")
"""Completion fields `/generate` takes under the same name, for the generated tokens."""

_PASSED_HEADERS = ("content-type",)


def may_score(request: httpx2.Request, content: bytes) -> bool:
    """Whether a request whose unparsed body is `content` may ask for prompt scoring
    (a substring test, as the router makes for the model: most completions never ask
    for `echo`)."""
    return b'"echo"' in content and request.method == "POST" and request.url.path == COMPLETIONS


def wants_scoring(request: httpx2.Request, body: dict[str, Any] | None) -> bool:
    """A completions request for an echoed prompt with its logprobs, not streamed,
    one choice per prompt."""
    if request.method != "POST" or request.url.path != COMPLETIONS:
        return False
    if body is None or body.get("echo") is not True or body.get("stream"):
        return False
    logprobs = body.get("logprobs")
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0:
        return False
    return body.get("n") in (None, 1) and _prompts(body.get("prompt")) is not None


def _prompts(prompt: Any) -> list[str | list[int]] | None:
    """The prompts of a completions request: text, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt) or all(
            isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt
        ):
            return list(prompt)
    return None


class ScoringPlan(RequestPlan):
    """A completions request that scores its prompts, answered from `/generate`."""

    def __init__(
        self, routing: Routing, request: httpx2.Request, info: RequestInfo, body: dict[str, Any]
    ) -> None:
        super().__init__(routing, request, info)
        self._body = body
        prompts = _prompts(body.get("prompt"))
        assert prompts is not None, "wants_scoring said yes"
        self._prompts = prompts

    def _send(
        self, node: NodeState, lease: Accounting, attempts: Attempts, ours: bool
    ) -> Steps[httpx2.Response]:
        if node.engine not in (None, "lmdeploy"):
            # vLLM and SGLang answer `echo` with logprobs themselves: the request as it came.
            return (yield from super()._send(node, lease, attempts, ours))
        body = self._body
        top = int(body["logprobs"])
        max_tokens = body.get("max_tokens")
        max_tokens = 16 if max_tokens is None else int(max_tokens)  # OpenAI's default
        sampling = {k: body[k] for k in SAMPLING if body.get(k) is not None}
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, prompt in enumerate(self._prompts):
            given: dict[str, Any] = (
                {"prompt": prompt} if isinstance(prompt, str) else {"input_ids": prompt}
            )
            asks = {"return_logprob": True, "top_logprobs_num": top, **given}
            score = yield from self._call(
                node, lease, attempts, ours, {**asks, "max_tokens": 0, "logprob_start_len": 0}
            )
            if isinstance(score, httpx2.Response):
                return score  # the node's refusal, for the caller
            step: dict[str, Any] = {"text": "", "output_ids": [], "meta_info": {}}
            if max_tokens > 0:
                answer = yield from self._call(
                    node, lease, attempts, ours, {**asks, **sampling, "max_tokens": max_tokens}
                )
                if isinstance(answer, httpx2.Response):
                    return answer
                step = answer
            choice, used = _choice(index, prompt, score, step, top)
            choices.append(choice)
            prompt_tokens += used
            completion_tokens += len(step.get("output_ids") or ())
        lease.finish(Outcome.SUCCESS)
        return httpx2.Response(
            200,
            json={
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
            headers={SERVED_VERSION_HEADER: str(node.weight_version)},
            request=self.request,
        )

    def _call(
        self,
        node: NodeState,
        lease: Accounting,
        attempts: Attempts,
        ours: bool,
        body: dict[str, Any],
    ) -> Steps[dict[str, Any] | httpx2.Response]:
        """One `/generate` on `node`: its JSON, or the node's refusal as the caller's
        answer (the lease ended), or `Retry` for a node failure."""
        # The routed request's timeouts (the first-byte bound applied), not a command's.
        timeout = self.request.extensions.get("timeout", {})
        request = self.routing.nodes.request(node, "POST", GENERATE, json=body, timeout=timeout)
        tracing.carry(self.request.headers, request.headers)
        reply = yield Call(request)
        if not isinstance(reply, httpx2.Response):
            attempts.transport_failed(lease, reply, "", ours)
        reason = attempts.retryable(lease, reply, "")
        if reason is not None and not attempts.exhausted():
            lease.finish(Outcome.FAILURE)
            raise Retry(reason)
        answer = reply.json() if reply.status_code == 200 else None
        if isinstance(answer, dict):
            return answer
        lease.finish(outcome_of_status(reply.status_code))
        headers = {k: v for k, v in reply.headers.items() if k.lower() in _PASSED_HEADERS}
        return httpx2.Response(
            reply.status_code, headers=headers, content=reply.content, request=self.request
        )


def _choice(
    index: int, prompt: str | list[int], score: dict[str, Any], step: dict[str, Any], top: int
) -> tuple[dict[str, Any], int]:
    """One choice as OpenAI's completions give it with `echo` (the prompt's tokens,
    then the generated ones; the first prompt token has no logprob), and how many
    prompt tokens it scored."""
    scored, generated = score.get("meta_info") or {}, step.get("meta_info") or {}
    rows = (scored.get("input_token_logprobs") or []) + (
        generated.get("output_token_logprobs") or []
    )
    first = [str(prompt[0])] if isinstance(prompt, list) else [""]
    logprobs: dict[str, Any] = {
        "tokens": first + [str(token) for _, token in rows],
        "token_logprobs": [None, *(value for value, _ in rows)],
        "top_logprobs": None,
        "text_offset": None,
    }
    if top > 0:
        tops = (scored.get("input_top_logprobs") or []) + (
            generated.get("output_top_logprobs") or []
        )
        logprobs["top_logprobs"] = [None, *({str(t): v for v, t in row} for row in tops)]
    reason = generated.get("finish_reason")
    text = (prompt if isinstance(prompt, str) else "") + str(step.get("text") or "")
    choice = {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": reason.get("type") if isinstance(reason, dict) else reason or "length",
    }
    return choice, len(scored.get("input_token_logprobs") or []) + 1
