"""httpx2 `Headers` built from header lines this package already split and lowercased.

`httpx2.Headers(pairs)` normalizes every name and value again and lowercases each
name (four calls per header); the proxy builds two per request (the caller's
request for the node, the node's answer) from lines the front door or the codec
split a moment before. `headers_from` builds the same object from
(name, lowercase name, value) triples: it sets the list httpx2 keeps them in, a
private attribute, so tests/wire/test_headers.py holds the result to the public
constructor's: an httpx2 that changes its insides fails there, not in a proxy.
`set_header` is `headers[name] = value` on that list, for the three headers each
routed request sets (its node's Host, and on the answer its request id and weight
version): httpx2's encodes both, lowercases, and scans the list with a comprehension,
~2 % of a proxied chat request's CPU for the three.
"""

from __future__ import annotations

import httpx2

Triples = list[tuple[bytes, bytes, bytes]]
"""Header lines as (name as sent, name lowercased, value), in order."""


def headers_from(triples: Triples) -> httpx2.Headers:
    """The `Headers` of `triples` (taken, not copied)."""
    headers = httpx2.Headers()
    headers._list = triples
    return headers


def set_header(headers: httpx2.Headers, name: bytes, value: bytes) -> None:
    """`headers[name] = value` (the first line of that name takes the value, the
    others go; else the line is added), with `name` and `value` already bytes."""
    lower = name.lower()
    lines = headers._list
    for index, line in enumerate(lines):
        if line[1] == lower:
            lines[index] = (name, lower, value)
            lines[index + 1 :] = [other for other in lines[index + 1 :] if other[1] != lower]
            return
    lines.append((name, lower, value))
