"""One request sent the same way to both servers, and what came back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx2
from conformance.differences import unexplained
from conformance.peer_support import API_KEY
from conformance.shapes import shape_diff

JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class Case:
    """A request: `body` is JSON-encoded unless `raw` is given; `auth` sends the key."""

    name: str
    method: str
    path: str
    body: Any = None
    raw: bytes | None = None
    json_type: bool = True
    auth: bool = True
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False


@dataclass
class Answer:
    status: int
    media_type: str
    body: Any  # parsed JSON, text, or (for streams) the list of SSE data payloads
    text: str


def send(client: httpx2.Client, base: str, case: Case, model: str) -> Answer:
    headers = dict(case.headers)
    if case.json_type:
        headers.update(JSON)
    if case.auth:
        headers["authorization"] = f"Bearer {API_KEY}"
    content = case.raw
    if content is None and case.body is not None:
        body = json.loads(json.dumps(case.body).replace("$MODEL", model))
        content = json.dumps(body).encode()
    response = client.request(case.method, base + case.path, content=content, headers=headers)
    media = response.headers.get("content-type", "").split(";")[0].strip()
    text = response.text
    parsed: Any = text
    if media == "text/event-stream":
        parsed = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
        parsed = [p if p == "[DONE]" else json.loads(p) for p in parsed]
    elif media == "application/json":
        parsed = json.loads(text) if text else None
    return Answer(response.status_code, media, parsed, text)


def compare(case: Case, real: Answer, sim: Answer) -> list[str]:
    """Unaccepted differences: status, content type, JSON shape, error message."""
    found: list[str] = []
    if real.status != sim.status:
        found.append(f"status: real {real.status}, sim {sim.status}")
    if real.media_type != sim.media_type:
        found.append(f"content-type: real {real.media_type!r}, sim {sim.media_type!r}")
    if real.media_type == sim.media_type == "application/json":
        found += shape_diff(real.body, sim.body)
        if (
            real.status >= 400
            and isinstance(real.body, dict)
            and isinstance(sim.body, dict)
            and real.body.get("message") != sim.body.get("message")
        ):
            found.append(
                f"message: real {real.body.get('message')!r}, sim {sim.body.get('message')!r}"
            )
    elif (
        real.media_type == sim.media_type == "text/plain"
        and real.status >= 400
        and real.text != sim.text
    ):
        found.append(f"message: real {real.text!r}, sim {sim.text!r}")
    return unexplained(case.name, found)
