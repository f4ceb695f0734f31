"""A request for an alias reaches its node under the node's own name, and its caller
reads back the name it asked for (lmfleet/node/names.py decides which names).

Both rewrites work on the bytes: the `"model"` field is found by a substring search
(as `Router.plan` finds it), so a request or an answer is not parsed and encoded
again, and a stream is rewritten chunk by chunk as it passes, holding back at most
the few bytes at a chunk's end that might begin the field. A shorter name is padded
with spaces after the field (JSON whitespace), so the body keeps its length and its
`Content-Length` stands: the common case costs no header work.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Iterator

import httpx2

from lmfleet.transport.request import PARSED_BODY


@functools.lru_cache(maxsize=64)
def model_fields(model: str) -> tuple[bytes, ...]:
    """`"model":"name"` as JSON encoders write it: compact or spaced, escaped or not
    (also what `Router.plan` looks for to skip parsing a body)."""
    names = dict.fromkeys(json.dumps(model, ensure_ascii=a).encode() for a in (False, True))
    return tuple(b'"model"' + sep + name for name in names for sep in (b":", b": "))


@functools.lru_cache(maxsize=64)
def _pairs(old: str, new: str) -> list[tuple[bytes, bytes]]:
    """Each way `old`'s field may be written, with `new`'s field written the same way
    (padded with spaces to the old one's length when shorter)."""
    new_name = json.dumps(new).encode()
    pairs = []
    for field in model_fields(old):
        sep = b": " if field.startswith(b'"model": ') else b":"
        written = b'"model"' + sep + new_name
        pairs.append((field, written.ljust(len(field))))
    return pairs


def renamed_request(request: httpx2.Request, asked: str, own: str) -> httpx2.Request:
    """A copy of `request` (aimed at its node already) whose body names the model
    `own` where it named `asked`: same method, URL, headers and extensions, a new
    `Content-Length` only when the body's length changed."""
    content = request.content
    for old, new in _pairs(asked, own):
        if old in content:
            renamed = content.replace(old, new, 1)
            break
    else:  # a spelling the search does not know: encode the parsed body again
        body = dict(request.extensions.get(PARSED_BODY) or json.loads(content))
        renamed = json.dumps({**body, "model": own}).encode()
    headers = request.headers
    if len(renamed) != len(content):
        headers = httpx2.Headers(headers)
        del headers["content-length"]  # set again from the new body
    return httpx2.Request(
        request.method, request.url, headers=headers, content=renamed, extensions=request.extensions
    )


class Renaming:
    """Rewrites `"model":"own"` to `"model":"asked"` in a body fed chunk by chunk."""

    def __init__(self, own: str, asked: str) -> None:
        self._pairs = _pairs(own, asked)
        self._starts, self._alphabet, self._longest = _starts(own, asked)
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """What of `chunk` (and the bytes held from the last one) can go on now."""
        data = self._held + chunk if self._held else chunk
        if b'"model"' in data:
            for old, new in self._pairs:
                data = data.replace(old, new)
        keep = self._partial(data)
        self._held = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep] if keep else data

    def end(self) -> bytes:
        """The bytes still held when the body ends."""
        held, self._held = self._held, b""
        return held

    def _partial(self, data: bytes) -> int:
        """How many bytes at `data`'s end may begin a field to rewrite (0: none)."""
        if not data or data[-1] not in self._alphabet:
            return 0  # the common case: an SSE chunk ends "\n\n", a JSON body "}"
        for size in range(min(self._longest, len(data)), 0, -1):
            piece = data[-size:]
            if any(start.startswith(piece) for start in self._starts):
                return size
        return 0


@functools.lru_cache(maxsize=64)
def _starts(own: str, asked: str) -> tuple[tuple[bytes, ...], frozenset[int], int]:
    """What `Renaming` looks for at a chunk's end: the fields to rewrite, their bytes,
    and the longest field but one byte."""
    starts = tuple(old for old, _ in _pairs(own, asked))
    return starts, frozenset(b"".join(starts)), max(map(len, starts)) - 1


class _RenamedAsync(httpx2.AsyncByteStream):
    def __init__(self, stream: httpx2.AsyncByteStream, renaming: Renaming) -> None:
        self._stream = stream
        self._renaming = renaming

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            out = self._renaming.feed(chunk)
            if out:
                yield out
        rest = self._renaming.end()
        if rest:
            yield rest

    async def aclose(self) -> None:
        await self._stream.aclose()


class _RenamedSync(httpx2.SyncByteStream):
    def __init__(self, stream: httpx2.SyncByteStream, renaming: Renaming) -> None:
        self._stream = stream
        self._renaming = renaming

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            out = self._renaming.feed(chunk)
            if out:
                yield out
        rest = self._renaming.end()
        if rest:
            yield rest

    def close(self) -> None:
        self._stream.close()


def rename_answer(response: httpx2.Response, own: str, asked: str) -> None:
    """Make `response`'s body name `asked` where the node wrote its own name `own`.

    A longer name lengthens the body: then its `Content-Length` goes (the body is
    sent as it comes, as a stream's is)."""
    renaming = Renaming(own, asked)
    if len(json.dumps(asked)) > len(json.dumps(own)):
        response.headers.pop("content-length", None)
    stream = response.stream
    if isinstance(stream, httpx2.AsyncByteStream) and not isinstance(stream, httpx2.SyncByteStream):
        response.stream = _RenamedAsync(stream, renaming)
    else:
        assert isinstance(stream, httpx2.SyncByteStream)
        response.stream = _RenamedSync(stream, renaming)
