"""`headers_from` (lmfleet/wire/headers.py) builds what httpx2's own constructor builds,
and `set_header` changes them as httpx2's `headers[name] = value` does: they use a
private attribute of httpx2's, so this is where a change of httpx2's insides must show."""

from __future__ import annotations

import httpx2

from lmfleet.wire.headers import headers_from, set_header

LINES = [(b"Content-Type", b"application/json"), (b"X-Twice", b"1"), (b"x-twice", b"2")]


def test_the_same_headers_as_httpx2_builds_from_the_lines() -> None:
    ours = headers_from([(name, name.lower(), value) for name, value in LINES])
    theirs = httpx2.Headers(LINES)
    assert ours == theirs
    assert ours.raw == theirs.raw
    assert ours.multi_items() == theirs.multi_items()
    assert ours["content-type"] == "application/json" and ours.get_list("X-TWICE") == ["1", "2"]
    assert ours.encoding == theirs.encoding == "ascii"
    ours["x-added"] = "3"  # changes as any Headers does
    assert ours.raw[-1] == (b"x-added", b"3")
    request = httpx2.Request("POST", "http://node/v1", headers=ours, content=b"{}")
    response = httpx2.Response(200, headers=ours)
    assert request.headers["x-twice"] == response.headers["x-twice"] == "1, 2"


def test_a_header_set_as_httpx2_sets_it() -> None:
    for name, value in [(b"Host", b"node:1"), (b"X-Twice", b"3"), (b"content-type", b"text/plain")]:
        ours, theirs = httpx2.Headers(LINES), httpx2.Headers(LINES)
        set_header(ours, name, value)
        theirs[name.decode()] = value.decode()
        assert ours.raw == theirs.raw, name
        assert ours.multi_items() == theirs.multi_items()
