"""A tighter bound on one blocking read of the sync client's connections.

The async drivers bound a read with a cancel scope. A blocking read has only the
request's read timeout, which httpcore fixes for a whole response body when it
starts reading it; a followed generation needs two bounds on one body: the time
to its first token (prefill of a long prompt: generous) and then the stall bound
between tokens (a few seconds). The sync client's connections therefore read
through `BoundedReads`, whose reads take the tighter of the request's timeout and
the bound the reading thread sets with `read_bound`.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import httpcore2
import httpx2

_BOUND: ContextVar[float | None] = ContextVar("lmfleet_read_bound", default=None)


@contextlib.contextmanager
def read_bound(seconds: float | None) -> Iterator[None]:
    """Bound each socket read this thread makes inside the block by `seconds`
    (None: the request's own timeout only); past it, httpx2's `ReadTimeout`."""
    if seconds is None:
        yield
        return
    token = _BOUND.set(seconds)
    try:
        yield
    finally:
        _BOUND.reset(token)


class _BoundedStream(httpcore2.NetworkStream):
    def __init__(self, stream: httpcore2.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        bound = _BOUND.get()
        if bound is not None and (timeout is None or bound < timeout):
            timeout = bound
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore2.NetworkStream:
        return _BoundedStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class BoundedReads(httpcore2.NetworkBackend):
    """httpcore's sync backend, its streams' reads bounded by `read_bound`."""

    def __init__(self) -> None:
        self._backend = httpcore2.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.NetworkStream:
        stream = self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _BoundedStream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.NetworkStream:
        return _BoundedStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def bounded_transport(limits: httpx2.Limits) -> httpx2.HTTPTransport:
    """httpx2's sync transport, reading through `BoundedReads`. httpx2 takes no
    network backend, so its pool's is replaced; should a release rename it, the
    transport is left as it is and only the request's own timeouts bound reads
    (tests/transport/test_read_bound.py notices)."""
    transport = httpx2.HTTPTransport(limits=limits)
    pool = getattr(transport, "_pool", None)
    if isinstance(getattr(pool, "_network_backend", None), httpcore2.SyncBackend):
        pool._network_backend = BoundedReads()  # type: ignore[union-attr]
    return transport
