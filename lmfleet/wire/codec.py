"""HTTP/1.1 framing for lmfleet's two lean clients: bytes in, heads and body pieces out.

The health prober (`wire/prober.py`) and the proxy's upstream transport
(`wire/upstream.py`) both speak plain HTTP/1.1 to nodes on their own asyncio
streams, because a general-purpose client costs more CPU than the rest of their
work. What they share is here, once: writing a request head, and reading a
response: the head, then the body as content-length, chunked or read-until-close,
and whether the connection may carry another request. Nothing here does I/O or
knows about timeouts, pools or retries; the callers feed it what they read.

Why hand-written: it costs within about 1 % of the two parsers it replaced, and
it runs on every install. `h11` (a core dependency through httpcore2) took 1.9x
the transport's instructions per plain request and 2.9x per SSE stream;
`httptools` (llhttp) saved 7 % of the proxy's instructions per SSE stream but cost
4 % more per plain request, and it is only in the `serve` extra while the prober
runs on core installs, so it could only be a second parser beside this one
(docs/benchmarks.md, "One HTTP/1.1 codec"). The grammar needed is small: a status
line, header lines, chunk-size lines, trailers.

It is strict where leniency would let a node smuggle or confuse: bare CR or LF,
obs-fold, a header name that is not a token, a non-numeric or conflicting
content-length, a chunk size that is not plain hex, bytes after a complete
response (the connection is then not reused). Interim 1xx responses are skipped.
Every such fault raises `Http1Error`, which the callers map onto their own errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal, NamedTuple

MAX_HEAD = 64 * 1024
"""Largest response head, chunk-size line or trailer section accepted, in bytes."""

Framing = Literal["none", "length", "chunked", "close"]

_WS = b" \t"
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [0-9]{3}(?: [^\r\n]*)?")
_HEADER_LINE = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+:[^\r\n]*")
_HEAD_SHAPE = re.compile(_STATUS_LINE.pattern + rb"\r\n(?:" + _HEADER_LINE.pattern + rb"\r\n)*\r\n")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r\n")
"""A chunk-size line: plain hex (no sign, prefix or underscore), extensions ignored."""
_NO_BODY_STATUS = frozenset({204, 304})


class Http1Error(Exception):
    """Not valid HTTP/1.1: a node's response (or a part of it too large), or a request
    head that would not be one line per header.

    Internal: `wire/prober.py` turns it into `ProbeError` and `wire/upstream.py` into
    httpx2's `RemoteProtocolError` (or `LocalProtocolError` for a bad request head).
    """


def encode_request_head(
    method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> bytes:
    """`METHOD target HTTP/1.1`, the header lines and the blank line, as one buffer.

    A CR or LF inside any part would end a line early and let a header value inject
    another header (or request): refused here, after one join, by counting.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    lines = 2
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
        lines += 1
    parts.append(b"\r\n")
    head = b"".join(parts)
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise Http1Error("a line break inside the request line or a header")
    return head


class ResponseHead(NamedTuple):
    """A parsed status line and headers, with what they mean for the body.

    A named tuple rather than a frozen dataclass: it is built once per response on
    the proxy's hot path, at less than half the cost.
    """

    status: int
    reason: bytes
    http_version: bytes
    """b"1.1" or b"1.0"."""
    headers: list[tuple[bytes, bytes, bytes]]
    """As received: (name, its case kept; name lowercased; value without surrounding
    whitespace), the shape httpx2 keeps headers in (lmfleet/wire/headers.py)."""
    framing: Framing
    content_length: int
    """The body's size for `framing == "length"`, else -1."""
    keep_alive: bool
    """The node allows another request on this connection once the body is read."""


def parse_response_head(head: bytes, *, head_request: bool = False) -> ResponseHead:
    """Parse a response head: every byte up to and including the blank line.

    One regular expression checks the whole shape first (status line, header lines
    whose names are tokens, CRLF line ends, no bare CR or LF, no obs-fold), which
    costs less than checking each line in Python; the split below can then trust it.
    """
    if _HEAD_SHAPE.fullmatch(head) is None:
        raise Http1Error(_head_fault(head))
    lines = head.split(b"\r\n")
    status_line = lines[0]
    version = status_line[5:8]
    status = int(status_line[9:12])
    reason = status_line[13:]
    headers: list[tuple[bytes, bytes, bytes]] = []
    length = -1
    encodings = b""
    connection = b""
    for line in lines[1:-2]:
        name, _, value = line.partition(b":")
        value = value.strip(_WS)
        lower = name.lower()
        headers.append((name, lower, value))
        if lower == b"content-length":
            if not value.isdigit() or len(value) > 18 or (length >= 0 and int(value) != length):
                raise Http1Error(f"bad or conflicting content-length: {value[:40]!r}")
            length = int(value)
        elif lower == b"transfer-encoding":
            encodings = encodings + b"," + value if encodings else value
        elif lower == b"connection":
            connection = connection + b"," + value if connection else value
    tokens = {t.strip(_WS) for t in connection.lower().split(b",")} if connection else set()
    keep = b"keep-alive" in tokens if version == b"1.0" else b"close" not in tokens
    framing: Framing
    if head_request or status in _NO_BODY_STATUS or status < 200:
        framing, length = "none", -1
    elif encodings:  # it overrides content-length (RFC 9112, 6.3)
        last = encodings.rsplit(b",", 1)[-1].strip(_WS).lower()
        framing, length = ("chunked" if last == b"chunked" else "close"), -1
    elif length >= 0:
        framing = "length"
    else:
        framing = "close"
    if framing == "close" or status == 101:
        keep = False
    return ResponseHead(status, reason, version, headers, framing, length, keep)


def _head_fault(head: bytes) -> str:
    """Say which part of a head that failed `_HEAD_SHAPE` is wrong (the error path only)."""
    lines = head.split(b"\r\n")
    if _STATUS_LINE.fullmatch(lines[0]) is None:
        return f"not an HTTP/1 status line: {lines[0][:80]!r}"
    for line in lines[1:-2]:
        if _HEADER_LINE.fullmatch(line) is None:
            return f"bad header line: {line[:80]!r}"
    return "bare CR or LF in the response head"


# States of a chunked body.
_SIZE, _DATA, _CRLF, _TRAILER = range(4)


class ResponseParser:
    """One response, fed as it arrives: the head once complete, then body pieces.

    `feed(data)` returns the body bytes decoded from `data` (possibly none) and sets
    `head` once the head is complete; `done` turns true at the end of the body.
    When the connection closes, `feed_eof()` ends a read-until-close body and
    raises `Http1Error` for anything cut short. Body pieces are slices of what was
    fed, so a burst of chunks costs one call, and a large chunk split across reads
    comes out in pieces rather than being buffered whole.
    """

    __slots__ = (
        "_buf",
        "_head_request",
        "_left",
        "_max_head",
        "_state",
        "_trailer_size",
        "done",
        "head",
        "rest",
        "started",
    )

    def __init__(self, *, head_request: bool = False, max_head: int = MAX_HEAD) -> None:
        self._head_request = head_request
        self._max_head = max_head
        self._buf = b""
        self._left = 0
        self._state = _SIZE
        self._trailer_size = 0
        self.rest = b""
        """Bytes after the complete response: the next pipelined response, or garbage."""
        self.head: ResponseHead | None = None
        self.done = False
        self.started = False
        """Any byte received: a connection that closes before this never saw the request."""

    @property
    def keep_alive(self) -> bool:
        """The connection can carry the next request: body complete, nothing after it."""
        return self.done and not self.rest and self.head is not None and self.head.keep_alive

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next bytes read from the connection; return the body bytes among them."""
        if not data:
            return []
        self.started = True
        if self.done:
            self.rest += data  # bytes after a complete response: not this response's
            return []
        if self.head is None:
            data = self._feed_head(data)
            if self.head is None or not data:
                return []
        framing = self.head.framing
        if framing == "chunked":
            return self._chunked(data)
        if framing == "length":
            return self._length(data)
        return [data]  # read until close

    def feed_eof(self) -> None:
        """The node closed the connection: the end of a read-until-close body, else an error."""
        if self.done:
            return
        if self.head is None:
            what = "the response head" if self.started else "any response byte"
            raise Http1Error(f"connection closed before {what}")
        if self.head.framing != "close":
            raise Http1Error("connection closed before the end of the body")
        self.done = True

    def _feed_head(self, data: bytes) -> bytes:
        """Collect the head; once complete parse it and return the bytes after it."""
        while True:
            start = max(0, len(self._buf) - 3)
            buf = self._buf + data if self._buf else data
            end = buf.find(b"\r\n\r\n", start)
            if end < 0:
                if len(buf) > self._max_head:
                    raise Http1Error(f"response head larger than {self._max_head} bytes")
                self._buf = buf
                return b""
            if end > self._max_head:
                raise Http1Error(f"response head larger than {self._max_head} bytes")
            self._buf = b""
            head = parse_response_head(buf[: end + 4], head_request=self._head_request)
            data = buf[end + 4 :]
            if not 100 <= head.status < 200 or head.status == 101:
                self.head = head
                if head.framing == "none" or (head.framing == "length" and not head.content_length):
                    self.done = True
                    self.rest = data
                    return b""
                self._left = head.content_length
                return data
            if not data:  # an interim response (100 Continue, 103 Early Hints): skip it
                return b""

    def _length(self, data: bytes) -> list[bytes]:
        left = self._left
        if len(data) < left:
            self._left = left - len(data)
            return [data]
        self._left = 0
        self.done = True
        if len(data) > left:
            self.rest = data[left:]
            data = data[:left]
        return [data]

    def _chunked(self, data: bytes) -> list[bytes]:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        out: list[bytes] = []
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _SIZE:
                line = _CHUNK_LINE.match(data, pos)
                if line is None:
                    eol = data.find(b"\r\n", pos)
                    if eol < 0:
                        return self._keep_partial(data, pos, out)
                    raise Http1Error(f"bad chunk size: {data[pos : min(eol, pos + 40)]!r}")
                size = int(line[1], 16)
                pos = line.end()
                if size == 0:
                    self._state = _TRAILER
                    continue
                stop = pos + size
                if stop + 2 <= end:  # the whole chunk is here: the common case
                    if data[stop : stop + 2] != b"\r\n":
                        raise Http1Error("chunk data not followed by CRLF")
                    out.append(data[pos:stop])
                    pos = stop + 2
                    continue
                self._left = size
                self._state = _DATA
            elif state == _DATA:
                stop = pos + self._left
                if stop > end:
                    out.append(data[pos:] if pos else data)
                    self._left = stop - end
                    return out
                out.append(data[pos:stop])
                pos = stop
                self._state = _CRLF
            elif state == _CRLF:
                if end - pos < 2:
                    return self._keep_partial(data, pos, out)
                if data[pos : pos + 2] != b"\r\n":
                    raise Http1Error("chunk data not followed by CRLF")
                pos += 2
                self._state = _SIZE
            else:  # trailer fields (ignored), then the blank line that ends the body
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    return self._keep_partial(data, pos, out)
                self._trailer_size += eol + 2 - pos
                if self._trailer_size > self._max_head:
                    raise Http1Error(f"trailers larger than {self._max_head} bytes")
                if eol == pos:
                    self.done = True
                    self.rest = data[eol + 2 :]
                    return out
                pos = eol + 2
        return out

    def _keep_partial(self, data: bytes, pos: int, out: list[bytes]) -> list[bytes]:
        """Hold an incomplete line (or CRLF) until the next read."""
        self._buf = data[pos:]
        if len(self._buf) > self._max_head:
            raise Http1Error(f"chunk-size or trailer line longer than {self._max_head} bytes")
        return out
