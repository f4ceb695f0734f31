"""The hub of `lmfleet serve --workers N` (lmfleet/proxy/hub.py) as its workers reach
it: a real unix socket, each worker's `HubLink`. The whole proxy over the hub is
tested in tests/cli/test_serve_workers.py."""

from __future__ import annotations

from pathlib import Path

import anyio

from lmfleet.proxy.hub import Hub
from lmfleet.proxy.shared import HubLink

X, Y = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
SLEEPING = {"status": {"status": "sleeping", "message": ""}}


def test_news_of_a_removed_node_does_not_bring_it_back(tmp_path: Path) -> None:
    """Worker 0 had not yet heard that worker 1 removed X when its monitor saw X fall
    asleep: that fact must not add X again, for the other workers or for a worker
    (re)started later. An introduction (with the node's entry) still adds a node,
    a removed one too."""

    async def main() -> None:
        hub = Hub(tmp_path / "hub.sock")
        async with anyio.create_task_group() as tg:
            await tg.start(hub.serve)
            w0, w1 = HubLink(hub.path, 0), HubLink(hub.path, 1)
            await w0.open()
            await w1.open()
            with anyio.fail_after(10):
                await w0.publish({"op": "node", "url": X, "fact": {"entry": {"url": X}}})
                assert (await w1.receive())["url"] == X
                await w1.publish({"op": "gone", "url": X})
                assert await w0.receive() == {"op": "gone", "url": X}
                await w0.publish({"op": "node", "url": X, "fact": SLEEPING})  # late news
                await w0.publish({"op": "node", "url": Y, "fact": {"entry": {"url": Y}}})
                assert (await w1.receive())["url"] == Y  # the late news was not relayed
                snapshot = await HubLink(hub.path, 2).open()
                assert set(snapshot["nodes"]) == {Y} and snapshot["gone"] == [X]
                await w0.publish({"op": "node", "url": X, "fact": {"entry": {"url": X}}})
                assert (await w1.receive())["url"] == X  # registered again: it is back
            assert set(hub.nodes) == {X, Y} and not hub.gone
            tg.cancel_scope.cancel()

    anyio.run(main)
