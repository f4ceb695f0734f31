"""SGLang's `/generate` and vLLM's `/inference/v1/generate` on the simulator.

Both are served by LMDeploy's `/generate` machinery (the same cost model, text
and token ids, so a generation continued across engines' sims stays exact): the
engine's body is read into LMDeploy's, and each answer is written back in the
engine's shape, as the pinned releases write theirs
(lmfleet/transport/token_dialects.py cites the files):

- SGLang: `{"text", "output_ids", "meta_info": {"id", "finish_reason",
  "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version"}}`,
  every stream event cumulative (SGLang's default; `--incremental-streaming-output`
  is not emulated);
- vLLM (`output_mode` "tokens", or "text" with each piece's text): stream events
  `{"request_id", "output_mode", "choices": [{"index": 0, "finish_reason",
  "stop_reason", "token_ids"}]}`, only those with new ids or a finish; the
  assembled answer one choice with every id, and `usage`.

The engine's own id for the request (`rid`, `request_id`) is what its abort
route takes: it maps to the sim's engine session while the request runs.
Validation errors keep LMDeploy's shape.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from lmfleet.sim import asgi
from lmfleet.sim.node import NodeRuntime
from lmfleet.sim.protocol import RequestError, decode_json, dumps

Reshape = Callable[[dict[str, Any]], dict[str, Any] | None]

_SESSIONS = itertools.count(1 << 40)  # beyond any session id a caller gives LMDeploy


def lmdeploy_body(engine: str, body: Any) -> tuple[dict[str, Any], str]:
    """`body`, an SGLang or vLLM token-route body, as LMDeploy's `/generate` body;
    and the engine's id for the request (the caller's, else a new one)."""
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object")
    sampling = body.get("sampling_params") or {}
    if not isinstance(sampling, dict):
        raise RequestError(400, "sampling_params must be an object")
    out: dict[str, Any] = {"stream": bool(body.get("stream"))}
    if engine == "sglang":
        name = body.get("rid")
        if body.get("text") is not None:
            out["prompt"] = body["text"]
        if body.get("input_ids") is not None:
            out["input_ids"] = body["input_ids"]
        out["max_tokens"] = sampling.get("max_new_tokens", 128)
    else:
        name = body.get("request_id")
        out["input_ids"] = body.get("token_ids")
        out["max_tokens"] = sampling.get("max_tokens", 16)
    for key in ("ignore_eos", "stop", "temperature", "top_p", "top_k", "seed"):
        if sampling.get(key) is not None:
            out[key] = sampling[key]
    return out, str(name) if name else f"sim-{next(_SESSIONS)}"


def session_for(rt: NodeRuntime, name: str) -> int:
    """A new engine session for the request the engine knows as `name`."""
    session = next(_SESSIONS)
    rt.engine_requests[name] = session
    return session


class Reshaper:
    """An ASGI `send` that writes LMDeploy's `/generate` answers in `engine`'s shape."""

    def __init__(
        self, send: asgi.Send, engine: str, name: str, body: dict[str, Any], rt: NodeRuntime
    ) -> None:
        self._send = send
        self._name = name
        self._start: asgi.Message | None = None
        self._stream = False
        self._ids: list[int] = []
        self._text = ""
        self._prompt = len(body.get("token_ids") or ()) if engine == "vllm" else 0
        self._text_mode = body.get("output_mode") == "text"
        self._version = str(rt.weights.weight_version)
        self._shape: Reshape = self._sglang if engine == "sglang" else self._vllm
        self._buffer = b""

    async def __call__(self, message: asgi.Message) -> None:
        if message["type"] == "http.response.start":
            kind = dict(message.get("headers") or ()).get(b"content-type", b"")
            self._stream = kind.startswith(b"text/event-stream")
            if self._stream or message["status"] != 200:
                await self._send(message)
            else:
                self._start = message  # sent with the reshaped body and its length
            return
        body = message.get("body", b"")
        if self._stream:
            await self._send({**message, "body": self._events(body)})
            return
        if self._start is None:
            await self._send(message)
            return
        data = dumps(self._assembled(self._shape(decode_json(body)) or {}))
        headers = [(k, v) for k, v in self._start["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(data)).encode()))
        await self._send({**self._start, "headers": headers})
        await self._send({"type": "http.response.body", "body": data})

    def _events(self, chunk: bytes) -> bytes:
        """The engine's events for LMDeploy's in `chunk` (whole events; `[DONE]` kept)."""
        self._buffer += chunk
        out: list[bytes] = []
        while (end := self._buffer.find(b"\n\n")) >= 0:
            raw, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            data = raw[len(b"data: ") :] if raw.startswith(b"data: ") else raw
            if data == b"[DONE]":
                out.append(raw + b"\n\n")
                continue
            shaped = self._shape(decode_json(data))
            if shaped is not None:
                out.append(b"data: " + dumps(shaped) + b"\n\n")
        return b"".join(out)

    def _sglang(self, event: dict[str, Any]) -> dict[str, Any]:
        meta = event.get("meta_info") or {}
        self._ids.extend(event.get("output_ids") or [])
        self._text += event.get("text") or ""
        return {
            "text": self._text,
            "output_ids": list(self._ids),
            "meta_info": {
                "id": self._name,
                "finish_reason": meta.get("finish_reason"),
                "prompt_tokens": meta.get("prompt_tokens"),
                "completion_tokens": len(self._ids),
                "cached_tokens": 0,
                "weight_version": self._version,
            },
        }

    def _vllm(self, event: dict[str, Any]) -> dict[str, Any] | None:
        ids = event.get("output_ids") or []
        self._ids.extend(ids)
        self._text += event.get("text") or ""
        finish = (event.get("meta_info") or {}).get("finish_reason")
        reason = finish.get("type") if isinstance(finish, dict) else None
        if not ids and reason is None:
            return None  # vLLM sends only events with new ids or a finish
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": reason,
            "stop_reason": None,
            "token_ids": ids,
        }
        if self._text_mode:
            choice["text"] = event.get("text") or ""
        return {"request_id": self._name, "output_mode": self._mode, "choices": [choice]}

    @property
    def _mode(self) -> str:
        return "text" if self._text_mode else "tokens"

    def _assembled(self, shaped: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed answer: SGLang's is its one event; vLLM's one choice, all ids."""
        if "choices" not in shaped:
            return shaped
        choice = {**shaped["choices"][0], "token_ids": self._ids}
        if self._text_mode:
            choice["text"] = self._text
        made = len(self._ids)
        return {
            "request_id": self._name,
            "output_mode": self._mode,
            "choices": [choice],
            "usage": {
                "prompt_tokens": self._prompt,
                "completion_tokens": made,
                "total_tokens": self._prompt + made,
            },
        }
