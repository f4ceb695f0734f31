"""The affinity key of a request: what `prefix_affinity` hashes.

Pure and cheap: it reads headers and an already-parsed JSON body, never the
network. In order of preference:

1. a header: `x-lmfleet-affinity` (explicit, for lmfleet) then `x-session-id`;
2. the body's `session_id` (LMDeploy's field; its "no session" value -1 is
   ignored) then `user` (OpenAI's end-user id);
3. the first `prefix_chars` characters of the prompt: for chat, the text of the
   messages up to and including the first user message (system prompt + first
   question, which is what a prefix cache shares); for `/v1/completions` and
   LMDeploy's `/generate`, `prompt` (or `input_ids`, as token ids).

None when there is nothing to key on; the strategy then balances by load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmfleet.plain_errors import ConfigError

AFFINITY_HEADERS = ("x-lmfleet-affinity", "x-session-id")
"""Headers read for an explicit key, most specific first."""


def affinity_key(
    headers: Mapping[str, str], body: Mapping[str, Any] | None, prefix_chars: int = 256
) -> str | None:
    """The key that should pin this request to a node, or None."""
    if prefix_chars < 1:
        raise ConfigError(f"prefix_chars must be >= 1, got {prefix_chars!r}")
    for name in AFFINITY_HEADERS:
        value = _header(headers, name)
        if value:
            return value
    if not isinstance(body, Mapping):
        return None
    session = body.get("session_id")
    if session is not None and not isinstance(session, bool) and session not in (-1, "-1", ""):
        return f"session:{session}"
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    prefix = _prompt_prefix(body, prefix_chars)
    return prefix[:prefix_chars] if prefix else None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup that also works on a plain dict."""
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate.strip()
        return None
    return value.strip()


def _prompt_prefix(body: Mapping[str, Any], limit: int) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        return _chat_prefix(messages, limit)
    prompt = body.get("prompt")
    if prompt is None:
        prompt = body.get("input_ids")
    return _completion_prefix(prompt, limit)


def _chat_prefix(messages: list[Any], limit: int) -> str:
    parts: list[str] = []
    size = 0
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        text = _text(message.get("content"))
        if text:
            parts.append(text)
            size += len(text) + 1
        if message.get("role") == "user" or size >= limit:
            break
    return "\n".join(parts)


def _text(content: Any) -> str:
    """A message's text: a string, or the `text` parts of a multimodal list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, Mapping)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts)
    return ""


def _completion_prefix(prompt: Any, limit: int) -> str:
    """`prompt` as str, list of str (first one), or token ids (list or batch)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, (str, list)):
            return _completion_prefix(first, limit)
        if isinstance(first, int):
            # Token ids: never more than `limit` of them, each at least one char.
            return "tokens:" + ",".join(str(token) for token in prompt[:limit])
    return ""
