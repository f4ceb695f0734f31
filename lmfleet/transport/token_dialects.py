"""Each engine's token-in, token-out route, as the fleet follows and continues it.

The three engines each have one route that takes token ids and streams the ids
it makes, which is what a continuation needs (lmfleet/transport/continuation.py):

- LMDeploy 0.18 `POST /generate` (`serve/openai/protocol.py` GenerateReqInput):
  `prompt` or `input_ids`, `max_tokens` (default 128), `session_id`; each event
  carries the new `output_ids` and `text`, and `meta_info` with `finish_reason`
  (`{"type": ...}`) and the token counts.
- SGLang 0.5.23 `POST /generate` (`srt/managers/io_struct.py` GenerateReqInput):
  `text` or `input_ids`, `sampling_params.max_new_tokens` (default 128), `rid`;
  events are LMDeploy's shape but cumulative (every event carries all the ids and
  text so far) unless the server runs with `--incremental-streaming-output`.
- vLLM 0.33.0 `POST /inference/v1/generate` (`entrypoints/scale_out/
  token_in_token_out/protocol.py` GenerateRequest; served with
  `--enable-scale-out` or `--tokens-only`): `token_ids`, `sampling_params.
  max_tokens` (default 16), `request_id`; each event's `choices[0]` carries the
  new `token_ids` and a `finish_reason` string.

A `TokenDialect` says, for one of them, which requests the fleet can continue, the
body of a continuation (the prompt's ids followed by every id made so far, the
token budget reduced by their number), how to read an event, what the caller sees
of a continued event, and the answer a non-streaming caller gets. Both `/generate`
routes share a path: the body says which engine it is written for (`text`,
`sampling_params` or `rid`: SGLang's; `prompt`, `max_tokens` or `session_id`:
LMDeploy's; `input_ids` alone: either, sent to the engine the fleet runs), and the
request goes only to nodes of that engine. `Generation` is what one generation
has made so far, over however many nodes, in the dialect it was asked in.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx2

GENERATE = "/generate"
VLLM_GENERATE = "/inference/v1/generate"
TOKEN_PATHS = frozenset({GENERATE, VLLM_GENERATE})

_NOT_FINISHED = b'"finish_reason":null'
_IDS = b'"output_ids":['
_TEXT = '"text":'
_STRINGS = json.JSONDecoder()
_SGLANG_ONLY = ("text", "sampling_params", "rid")
_LMDEPLOY_ONLY = ("prompt", "max_tokens", "session_id")


def ids_of(value: Any) -> list[int] | None:
    """`value` when it looks like a list of token ids: a long prompt is not scanned
    on every request (the node validates them, and its refusal reaches the caller)."""
    if isinstance(value, list) and value and type(value[0]) is int:
        return value
    return None


class TokenDialect:
    """One engine's token route (see the module docstring); LMDeploy's by default."""

    engine: ClassVar[str] = "lmdeploy"
    path: ClassVar[str] = GENERATE
    default_max_tokens: ClassVar[int] = 128
    encodes: ClassVar[bool] = True
    """A text prompt's ids come from the node (`/v1/encode`) at the first cut."""

    def continuable(self, body: dict[str, Any]) -> bool:
        """A generation of one sequence from one prompt, whose events carry all a
        continuation needs (not a prompt scored, not images)."""
        start = body.get("logprob_start_len")
        if isinstance(start, int) and start >= 0:
            return False
        return body.get("image_data") is None and (
            ids_of(body.get("input_ids")) is not None or isinstance(body.get("prompt"), str)
        )

    def max_tokens(self, body: dict[str, Any]) -> int:
        given = body.get("max_tokens")
        return self.default_max_tokens if given is None else int(given)

    def handle(self, body: dict[str, Any]) -> int | str:
        """The engine's id of the next node request, by which one request is aborted:
        the caller's own, else a new one (LMDeploy: an engine session)."""
        given = body.get("session_id")
        if type(given) is int and given >= 0:
            return given
        return random.getrandbits(30) + 1

    def with_handle(self, body: dict[str, Any], handle: int | str) -> dict[str, Any]:
        return {**body, "session_id": handle}

    def prompt_ids(self, body: dict[str, Any]) -> list[int] | None:
        return ids_of(body.get("input_ids"))

    def next_body(self, gen: Generation) -> dict[str, Any]:
        """The body for the next node: the original, streamed, or its continuation."""
        body = {**gen.body, "stream": True}
        if not gen.offset:
            return body
        body["max_tokens"] = gen.max_tokens - gen.offset
        ids = self.prompt_ids(gen.body) or gen.prompt_ids
        if ids is not None:
            body.pop("prompt", None)
            body["input_ids"] = ids + gen.output_ids
        else:
            body["prompt"] = str(gen.body.get("prompt") or "") + gen.text
        return body

    def add(self, gen: Generation, event: dict[str, Any], version: int) -> dict[str, Any]:
        """Record one of the node's events; the event as the caller sees it."""
        gen.record(event.get("output_ids") or [], event.get("text") or "", version)
        meta = event.get("meta_info") or {}
        if gen.prompt_tokens is None:
            gen.prompt_tokens = meta.get("prompt_tokens")
        for name, into in (
            ("output_token_logprobs", gen.logprobs),
            ("output_top_logprobs", gen.top_logprobs),
        ):
            rows = meta.get(name)
            if rows:
                into.extend(rows)
        gen.finish = meta.get("finish_reason")
        if meta.get("routed_experts") is not None:
            gen.routed_experts = meta["routed_experts"]
        if gen.offset:  # a continued segment: counts as the caller's whole generation
            meta = {**meta, "prompt_tokens": gen.prompt_tokens}
            meta["completion_tokens"] = gen.offset + int(meta.get("completion_tokens") or 0)
        if gen.finish is not None:
            meta = {**meta, "weight_versions": gen.versions}
        return {**event, "meta_info": meta} if meta is not event.get("meta_info") else event

    def assembled(self, gen: Generation) -> dict[str, Any]:
        """The non-streamed answer, as LMDeploy's `/generate` assembles its own."""
        return {
            "text": gen.text,
            "output_ids": gen.output_ids,
            "meta_info": {
                "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": len(gen.output_ids),
                "finish_reason": gen.finish,
                "output_token_logprobs": gen.logprobs or None,
                "input_token_logprobs": None,
                "output_top_logprobs": gen.top_logprobs or None,
                "input_top_logprobs": None,
                "routed_experts": gen.routed_experts,
                "weight_versions": gen.versions,
            },
        }


class SglangDialect(TokenDialect):
    """SGLang's `/generate`: sampling in `sampling_params`, events cumulative (or
    incremental: told apart per event by `completion_tokens`). A text prompt is
    continued as text (the prompt followed by the text so far)."""

    engine = "sglang"
    encodes = False

    def continuable(self, body: dict[str, Any]) -> bool:
        sampling = body.get("sampling_params")
        if sampling is not None and (
            not isinstance(sampling, dict) or sampling.get("n") not in (None, 1)
        ):
            return False
        if body.get("return_logprob") or body.get("image_data") is not None:
            return False  # logprob rows are not joined across nodes for SGLang
        if body.get("input_embeds") is not None or not isinstance(body.get("rid", ""), str):
            return False
        return ids_of(body.get("input_ids")) is not None or isinstance(body.get("text"), str)

    def max_tokens(self, body: dict[str, Any]) -> int:
        given = (body.get("sampling_params") or {}).get("max_new_tokens")
        return self.default_max_tokens if given is None else int(given)

    def handle(self, body: dict[str, Any]) -> int | str:
        given = body.get("rid")
        return given if isinstance(given, str) and given else uuid.uuid4().hex

    def with_handle(self, body: dict[str, Any], handle: int | str) -> dict[str, Any]:
        return {**body, "rid": handle}

    def next_body(self, gen: Generation) -> dict[str, Any]:
        body = {**gen.body, "stream": True}
        if not gen.offset:
            return body
        sampling = dict(gen.body.get("sampling_params") or {})
        sampling["max_new_tokens"] = gen.max_tokens - gen.offset
        body["sampling_params"] = sampling
        ids = self.prompt_ids(gen.body)
        if ids is not None:
            body["input_ids"] = ids + gen.output_ids
        else:
            body["text"] = str(gen.body.get("text") or "") + gen.text
        return body

    def add(self, gen: Generation, event: dict[str, Any], version: int) -> dict[str, Any]:
        ids = event.get("output_ids") or []
        text = event.get("text") or ""
        meta = event.get("meta_info") or {}
        made = meta.get("completion_tokens")
        # Cumulative: the event holds the segment's every id (its count is the
        # segment's token count); incremental events hold only the new ones.
        cumulative = isinstance(made, int) and len(ids) == made
        if cumulative:
            segment_text = len(gen.text) - gen.text_offset
            gen.record(ids[len(gen.output_ids) - gen.offset :], text[segment_text:], version)
        else:
            gen.record(ids, text, version)
        if gen.prompt_tokens is None:
            gen.prompt_tokens = meta.get("prompt_tokens")
        gen.finish = meta.get("finish_reason")
        gen.last = event
        if not gen.offset and gen.finish is None:
            return event
        meta = {**meta, "prompt_tokens": gen.prompt_tokens}
        meta["completion_tokens"] = gen.offset + int(made or 0)
        if gen.finish is not None:
            meta["weight_versions"] = gen.versions
        shown = {**event, "meta_info": meta}
        if gen.offset and cumulative:  # the caller's events stay cumulative over nodes
            shown["output_ids"] = list(gen.output_ids)
            shown["text"] = gen.text
        return shown

    def assembled(self, gen: Generation) -> dict[str, Any]:
        meta = dict((gen.last or {}).get("meta_info") or {})
        meta.update(
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=len(gen.output_ids),
            finish_reason=gen.finish,
            weight_versions=gen.versions,
        )
        return {"text": gen.text, "output_ids": gen.output_ids, "meta_info": meta}


class VllmDialect(TokenDialect):
    """vLLM's `/inference/v1/generate`: token ids only, events in `choices`."""

    engine = "vllm"
    path = VLLM_GENERATE
    default_max_tokens = 16  # vllm/sampling_params.py SamplingParams.max_tokens
    encodes = False

    def continuable(self, body: dict[str, Any]) -> bool:
        sampling = body.get("sampling_params")
        if sampling is not None and not isinstance(sampling, dict):
            return False
        sampling = sampling or {}
        if sampling.get("n") not in (None, 1) or sampling.get("logprobs") is not None:
            return False  # logprob rows are not joined across nodes for vLLM
        if sampling.get("prompt_logprobs") is not None or body.get("features") is not None:
            return False
        if body.get("output_mode", "tokens") not in ("tokens", "text"):
            return False
        return ids_of(body.get("token_ids")) is not None and isinstance(
            body.get("request_id", ""), str
        )

    def max_tokens(self, body: dict[str, Any]) -> int:
        given = (body.get("sampling_params") or {}).get("max_tokens")
        return self.default_max_tokens if given is None else int(given)

    def handle(self, body: dict[str, Any]) -> int | str:
        given = body.get("request_id")
        return given if isinstance(given, str) and given else uuid.uuid4().hex

    def with_handle(self, body: dict[str, Any], handle: int | str) -> dict[str, Any]:
        return {**body, "request_id": handle}

    def prompt_ids(self, body: dict[str, Any]) -> list[int] | None:
        return ids_of(body.get("token_ids"))

    def next_body(self, gen: Generation) -> dict[str, Any]:
        body = {**gen.body, "stream": True}
        if not gen.offset:
            return body
        sampling = dict(gen.body.get("sampling_params") or {})
        sampling["max_tokens"] = gen.max_tokens - gen.offset
        body["sampling_params"] = sampling
        body["token_ids"] = (self.prompt_ids(gen.body) or []) + gen.output_ids
        return body

    def add(self, gen: Generation, event: dict[str, Any], version: int) -> dict[str, Any]:
        if gen.prompt_tokens is None:
            gen.prompt_tokens = len(self.prompt_ids(gen.body) or ())
        gen.last = event
        shown = event  # the node's own event (and bytes) unless the fleet changes it
        usage = event.get("usage")
        if gen.offset and isinstance(usage, dict):  # counts of the caller's whole generation
            made = gen.offset + int(usage.get("completion_tokens") or 0)
            shown = {
                **event,
                "usage": {
                    **usage,
                    "prompt_tokens": gen.prompt_tokens,
                    "completion_tokens": made,
                    "total_tokens": gen.prompt_tokens + made,
                },
            }
        choices = event.get("choices") or []
        if not choices:
            return shown
        choice = choices[0]
        gen.record(choice.get("token_ids") or [], choice.get("text") or "", version)
        reason = choice.get("finish_reason")
        gen.finish = {"type": reason} if isinstance(reason, str) else None
        if gen.finish is not None:
            spanned = {**choice, "weight_versions": self.spans(gen)}
            shown = {**shown, "choices": [spanned, *choices[1:]]}
        return shown

    @staticmethod
    def spans(gen: Generation) -> list[dict[str, Any]]:
        """The versions of the tokens, in vLLM's own `WeightVersionSpan` shape."""
        return [{"version": str(v), "start": a, "end": b} for a, b, v in gen.versions]

    def assembled(self, gen: Generation) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": (gen.finish or {}).get("type"),
            "stop_reason": None,
            "token_ids": gen.output_ids,
            "weight_versions": self.spans(gen),
        }
        if gen.body.get("output_mode") == "text":
            choice["text"] = gen.text
        made = len(gen.output_ids)
        prompt = gen.prompt_tokens or 0
        return {
            "request_id": (gen.last or {}).get("request_id"),
            "output_mode": gen.body.get("output_mode", "tokens"),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": made,
                "total_tokens": prompt + made,
            },
        }


LMDEPLOY = TokenDialect()
SGLANG = SglangDialect()
VLLM = VllmDialect()


@dataclass
class Generation:
    """What one generation has produced so far, over however many nodes."""

    body: dict[str, Any]
    stream: bool
    dialect: TokenDialect = LMDEPLOY
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int | None = None
    finish: dict[str, Any] | None = None
    logprobs: list[Any] = field(default_factory=list)
    top_logprobs: list[Any] = field(default_factory=list)
    routed_experts: Any = None
    versions: list[list[int]] = field(default_factory=list)
    offset: int = 0  # output tokens made before the current node's request
    text_offset: int = 0  # and the length of their text
    prompt_ids: list[int] | None = None  # a text prompt's ids, once a node encoded it
    encoded: bool = False  # a node was asked for them (its answer may be no ids)
    continued: int = 0
    last: dict[str, Any] | None = None  # the node's last event (kept where a dialect needs it)

    def session(self) -> int | str:
        """The engine's id of the next node request (`TokenDialect.handle`)."""
        return self.dialect.handle(self.body)

    @property
    def max_tokens(self) -> int:
        return self.dialect.max_tokens(self.body)

    def request_body(self, handle: int | str) -> dict[str, Any]:
        """The body for the next node, as request `handle`: the original, or its
        continuation."""
        self.offset = len(self.output_ids)
        self.text_offset = len(self.text)
        return self.dialect.with_handle(self.dialect.next_body(self), handle)

    def add(self, event: dict[str, Any], version: int) -> dict[str, Any]:
        """Record one of the node's events; the event as the caller sees it."""
        return self.dialect.add(self, event, version)

    def plain_token(self, data: bytes, version: int) -> bool:
        """Record an event without parsing it, where that is exact: a token of the
        first node (nothing to rewrite), not the last event, with no logprobs to
        keep. Only its `output_ids` and `text` matter then, and they are sliced out
        (a parse per token cost the proxy a tenth of its `/generate` rate). False:
        the caller parses the event."""
        if (
            self.offset
            or self.dialect is not LMDEPLOY
            or self.prompt_tokens is None
            or self.logprobs_asked
            or _NOT_FINISHED not in data
        ):
            return False
        start = data.find(_IDS)
        end = data.find(b"]", start)
        decoded = data.decode()
        text_at = decoded.find(_TEXT)
        if start < 0 or end < 0 or text_at < 0:
            return False
        try:
            ids = [int(token) for token in data[start + len(_IDS) : end].split(b",") if token]
            text, _ = _STRINGS.raw_decode(decoded, text_at + len(_TEXT))
        except ValueError:
            return False
        if not isinstance(text, str):
            return False
        self.record(ids, text, version)
        return True

    @property
    def needs_prompt_ids(self) -> bool:
        """A cut generation of a text prompt, not yet encoded: its continuation is
        exact only from the ids the node made of the prompt."""
        return (
            self.dialect.encodes
            and bool(self.output_ids)
            and not self.encoded
            and "input_ids" not in self.body
        )

    def take_encoded(self, reply: httpx2.Response) -> None:
        """Keep the ids of a `/v1/encode` answer; none (the text rule) when it has none."""
        self.encoded = True
        if reply.status_code == 200:
            try:
                self.prompt_ids = ids_of(reply.json().get("input_ids"))
            except (ValueError, AttributeError):
                self.prompt_ids = None

    @property
    def logprobs_asked(self) -> bool:
        return bool(self.body.get("return_logprob"))

    def record(self, ids: list[int], text: str, version: int) -> None:
        """Add one event's tokens and text, in the version segment they belong to."""
        start = len(self.output_ids)
        self.output_ids.extend(ids)
        self.text += text
        if ids:
            last = self.versions[-1] if self.versions else None
            if last is not None and last[2] == version and last[1] == start:
                last[1] = len(self.output_ids)
            else:
                self.versions.append([start, len(self.output_ids), version])

    @property
    def aborted(self) -> bool:
        return (self.finish or {}).get("type") == "abort"

    @property
    def done(self) -> bool:
        """Ended for the caller: a finish (an abort not made for a weight update
        included: `fleet.abort`, `/abort_request`, an update that aborts), or no
        token left to make."""
        return self.finish is not None or len(self.output_ids) >= self.max_tokens

    def assembled(self) -> dict[str, Any]:
        """The non-streamed answer, as the engine assembles its own."""
        return self.dialect.assembled(self)

    def versions_header(self) -> str:
        return ",".join(f"{a}-{b}:{v}" for a, b, v in self.versions)


def dialect_of(
    path: str, body: dict[str, Any] | None, engines: Callable[[], Collection[str]]
) -> TokenDialect:
    """The dialect a token-route request is written in (see the module docstring);
    `engines()`: the engines the fleet's nodes run, asked only for a body either
    engine takes."""
    if path == VLLM_GENERATE:
        return VLLM
    if body is not None:
        if any(key in body for key in _SGLANG_ONLY):
            return SGLANG
        if any(key in body for key in _LMDEPLOY_ONLY):
            return LMDEPLOY
    running = engines()
    return SGLANG if "sglang" in running and "lmdeploy" not in running else LMDEPLOY
