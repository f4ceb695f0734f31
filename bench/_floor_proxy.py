"""A floor for a Python proxy: the least one can do per request on uvloop protocols.

Round robin over the nodes, one kept-alive upstream connection per request in
flight (one the node closed while idle is dropped), no parsing beyond the heads'
lengths, no routing, no metrics, no timeouts, no errors handled. Not a product:
`bench/proxy_overhead.py --only floor` measures it beside `lmfleet serve` to say how
much of lmfleet's CPU per non-streamed request is Python's and the loop's, and how
much is lmfleet's own work. (Its streams relay each chunk as it comes, with a
write per chunk: no floor for streaming.)

    python bench/_floor_proxy.py PORT NODE_URL [NODE_URL ...]
"""

from __future__ import annotations

import asyncio
import itertools
import sys

import uvloop

END = b"\r\n\r\n"
TASKS: set[asyncio.Future[None]] = set()


def _length(head: bytes) -> int | None:
    """The body's length from a head, None for a chunked body."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None


class Upstream(asyncio.Protocol):
    """One connection to a node; relays one answer at a time to `client`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.client: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None
        self.head = b""
        self.left: int | None = -1  # -1: in the head; None: chunked

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.client is not None and self.done is not None
        self.client.write(data)
        if self.left == -1:
            self.head += data
            end = self.head.find(END)
            if end < 0:
                return
            self.left = _length(self.head[:end])
            body = self.head[end + 4 :]
            self.head = b""
            data = body
            if self.left is None:
                self._chunked(data)
                return
        if self.left is None:
            self._chunked(data)
        else:
            self.left -= len(data)
            if self.left <= 0:
                self._finish()

    def _chunked(self, data: bytes) -> None:
        self.head = (self.head + data)[-5:]
        if self.head.endswith(b"0\r\n\r\n"):
            self._finish()

    def _finish(self) -> None:
        self.head, self.left = b"", -1
        assert self.done is not None
        self.done.set_result(None)


class Front(asyncio.Protocol):
    def __init__(
        self, nodes: itertools.cycle[tuple[str, int]], pools: dict[tuple[str, int], list[Upstream]]
    ) -> None:
        self.nodes, self.pools = nodes, pools
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(END)
        if end < 0:
            return
        size = _length(self.buffer[:end]) or 0
        if len(self.buffer) < end + 4 + size:
            return
        request, self.buffer = self.buffer[: end + 4 + size], self.buffer[end + 4 + size :]
        task = asyncio.ensure_future(self.forward(request))
        TASKS.add(task)  # kept until done: the loop holds tasks weakly
        task.add_done_callback(TASKS.discard)

    async def forward(self, request: bytes) -> None:
        node = next(self.nodes)
        idle = self.pools[node]
        while idle and idle[-1].transport.is_closing():  # closed by the node while idle
            idle.pop()
        if idle:
            upstream = idle.pop()
        else:
            loop = asyncio.get_running_loop()
            _, upstream = await loop.create_connection(Upstream, *node)
        upstream.client = self.transport
        upstream.done = asyncio.get_running_loop().create_future()
        assert upstream.transport is not None
        upstream.transport.write(request)
        await upstream.done
        idle.append(upstream)


async def main(port: int, urls: list[str]) -> None:
    nodes = [(u.split("//")[1].split(":")[0], int(u.rsplit(":", 1)[1])) for u in urls]
    pools: dict[tuple[str, int], list[Upstream]] = {node: [] for node in nodes}
    cycle = itertools.cycle(nodes)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Front(cycle, pools), "127.0.0.1", port, backlog=2048)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2:]))
