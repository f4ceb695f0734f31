"""A minimal HTTP/1.1 GET for health probes, one kept-alive connection per node.

The monitor sends one `GET /health` per node per interval, forever: with a
general-purpose client that costs about 0.3 ms of CPU a probe here, which at 64
nodes and 1 s is several percent of a core. This reader does only what a probe
needs at a fraction of that: one request head written once per target, the
response read through the shared HTTP/1.1 codec (`lmfleet/http1.py`, which the
proxy's upstream transport uses too), the connection kept when the codec says so.
Everything else the fleet sends still goes through httpx2.

`get_many` pipelines several GETs on the connection (one write, answers read in
order): a node whose `/health` and `/metrics` are both read each round costs one
round trip instead of two, and the event loop's I/O is most of a probe's cost.

It uses asyncio streams directly: the fleet's loop is always asyncio (see
`background.py`), and anyio's stream wrappers add a scheduling checkpoint to every
send and receive, which here was a third of the cost. Timeouts still come from
anyio cancel scopes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from urllib.parse import urlsplit

import anyio

from lmfleet.http1 import Http1Error, ResponseParser, encode_request_head

MAX_BODY = 1024 * 1024
READ_SIZE = 64 * 1024

_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_Target = tuple[str, int, bool, bytes]


class ProbeError(Exception):
    """The node could not be reached or answered something that is not HTTP."""


class Prober:
    """GET small JSON documents from nodes, reusing one connection per node."""

    def __init__(self) -> None:
        self._idle: dict[str, _Connection] = {}
        self._targets: dict[tuple[str, str, str | None], _Target] = {}

    def _target(self, url: str, path: str, api_key: str | None) -> _Target:
        target = self._targets.get((url, path, api_key))
        if target is None:
            parts = urlsplit(url)
            tls = parts.scheme == "https"
            headers = [(b"Host", parts.netloc.encode()), (b"Accept", b"*/*")]
            if api_key:
                headers.append((b"Authorization", b"Bearer " + api_key.encode()))
            request = encode_request_head(b"GET", path.encode(), headers)
            port = parts.port or (443 if tls else 80)
            target = (parts.hostname or "", port, tls, request)
            self._targets[(url, path, api_key)] = target
        return target

    async def get(
        self, url: str, path: str, timeout: float, api_key: str | None = None
    ) -> tuple[int, bytes]:
        """(status, body) of `GET url+path`; `ProbeError` on any failure or after `timeout`.

        `api_key` is sent as a Bearer token (the node's own key: `/metrics` may need it).
        """
        (answer,) = await self.get_many(url, (path,), timeout, api_key)
        return answer

    async def get_many(
        self, url: str, paths: Sequence[str], timeout: float, api_key: str | None = None
    ) -> list[tuple[int, bytes]]:
        """(status, body) of `GET url+path` for each of `paths`, pipelined on one connection.

        All of it within `timeout`, else `ProbeError`. A node that closes the connection
        after an answer (no keep-alive) gets the remaining requests on a new one.
        """
        heads = [self._target(url, path, api_key) for path in paths]
        host, port, tls, _ = heads[0]
        answers: list[tuple[int, bytes]] = []
        try:
            with anyio.fail_after(timeout):
                pooled = self._idle.pop(url, None)
                if pooled is not None:
                    try:
                        return await self._exchange(url, pooled, heads, answers)
                    except (ProbeError, OSError, Http1Error):
                        del answers[:]  # a kept-alive connection the node had closed: retry
                while len(answers) < len(heads):
                    connection = await asyncio.open_connection(host, port, ssl=tls or None)
                    await self._exchange(url, connection, heads[len(answers) :], answers)
                return answers
        except TimeoutError as exc:
            raise ProbeError(f"no answer within {timeout:g} s") from exc
        except Http1Error as exc:
            raise ProbeError(str(exc)) from exc
        except (OSError, ValueError) as exc:
            raise ProbeError(f"{type(exc).__name__}: {exc}") from exc

    async def _exchange(
        self,
        url: str,
        conn: _Connection,
        heads: Sequence[_Target],
        answers: list[tuple[int, bytes]],
    ) -> list[tuple[int, bytes]]:
        """Send `heads` in one write and append their answers to `answers`, in order.

        Stops early, closing the connection, where an answer ends the connection."""
        reader, writer = conn
        keep = False
        try:
            writer.write(b"".join(head[3] for head in heads))
            pending = b""
            for _ in heads:
                status, body, keep, pending = await _read_response(reader, pending)
                answers.append((status, body))
                if not keep:
                    break
            keep = keep and not pending
            return answers
        finally:
            if keep:
                self._idle[url] = conn
            else:
                writer.close()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for _, writer in idle.values():
            with contextlib.suppress(OSError):
                writer.close()


async def _read_response(
    reader: asyncio.StreamReader, pending: bytes = b""
) -> tuple[int, bytes, bool, bytes]:
    """(status, body, keep-alive, bytes after it) of the next response; `Http1Error` if malformed.

    `pending` is what the previous read took past the previous response (pipelining)."""
    parser = ResponseParser()
    body = bytearray()
    data = pending
    while True:
        for piece in parser.feed(data):
            body += piece
        head = parser.head
        if len(body) > MAX_BODY or (head is not None and head.content_length > MAX_BODY):
            raise ProbeError("response body too large")
        if parser.done:
            break
        data = await reader.read(READ_SIZE)
        if not data:
            parser.feed_eof()
            break
    assert parser.head is not None  # done implies a head
    keep = parser.done and parser.head.keep_alive
    return parser.head.status, bytes(body), keep, parser.rest
