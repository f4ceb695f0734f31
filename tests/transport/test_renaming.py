"""The model name rewritten in a request's body and in an answer fed chunk by chunk."""

from __future__ import annotations

import json

import httpx2
from hypothesis import given
from hypothesis import strategies as st

from lmfleet.transport.renaming import Renaming, renamed_request

OWN = "/data/models/internlm2_5-7b-chat"
ASKED = "internlm2.5-7b"


def sent(request: httpx2.Request) -> bytes:
    body = b"".join(request.stream)  # type: ignore[arg-type]
    assert request.headers["content-length"] == str(len(body))
    return body


def test_a_request_body_names_the_node_s_model() -> None:
    for body in (
        json.dumps({"messages": [], "model": ASKED}),
        json.dumps({"model": ASKED}, separators=(",", ":")),
    ):
        content = body.encode()
        request = httpx2.Request("POST", "http://n:1/v1/chat/completions", content=content)
        copy = renamed_request(request, ASKED, OWN)
        assert json.loads(sent(copy))["model"] == OWN
        assert copy.extensions == request.extensions
        # A shorter name is padded: the length, and the header, stand.
        short = renamed_request(request, ASKED, "short")
        assert json.loads(sent(short))["model"] == "short"
        assert len(sent(short)) == len(content)


def test_an_odd_spelling_is_encoded_again() -> None:
    content = b'{"model" :\t"internlm2.5-7b", "n": 1}'
    request = httpx2.Request("POST", "http://n:1/v1/completions", content=content)
    assert json.loads(sent(renamed_request(request, ASKED, OWN))) == {"model": OWN, "n": 1}


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_an_answer_split_anywhere_reads_the_asked_name(cuts: list[int]) -> None:
    events = [
        json.dumps({"id": i, "model": OWN, "choices": [{"delta": {"content": "x"}}]})
        for i in range(3)
    ]
    body = "".join(f"data: {e}\n\n" for e in events).encode()
    chunks, at = [], 0
    for cut in cuts:
        chunks.append(body[at : at + cut])
        at += cut
    chunks.append(body[at:])
    renaming = Renaming(OWN, ASKED)
    out = b"".join(renaming.feed(c) for c in chunks) + renaming.end()
    padded = json.dumps(ASKED).encode().ljust(len(json.dumps(OWN)))
    assert out == body.replace(json.dumps(OWN).encode(), padded)
    assert len(out) == len(body)  # a shorter name keeps the length: Content-Length stands
