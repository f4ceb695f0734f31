"""The hub the `lmfleet serve --workers N` supervisor runs for its workers.

It relays each fact a worker publishes (lmfleet/proxy/shared.py) to every other
worker, and keeps the latest fact per node, the removed nodes and the fleet's
versions, so that a worker that starts (or restarts after a crash) first gets the
whole picture; the nodes' `/metrics` reports one worker read (`loads`) it relays
without keeping them. Each worker's requests in flight per node (`held`) it sums instead
(`HeldTotals`): every `SYNC_EVERY` each worker is told the others' sums that
changed, as one peer named `hub` (N messages a tick for N workers, where a relay of
every worker's counts to every other was N x (N - 1)). A worker whose line closes
(it ended, or was killed) counts for nothing from then on. It also carries a
question one worker asks all the others and waits for (`ask`): a `/metrics` scrape
(each answers its text, and the asker answers one view), or a `sync` (each answers
once it has applied every fact sent before: the asker then knows its decision
reached all, before it acts on a node).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream, TaskGroup, TaskStatus

from lmfleet.proxy.shared import (
    GONE,
    HELD_EVERY,
    SCRAPE_TIMEOUT,
    SYNC_EVERY,
    UNREADABLE,
    Backoff,
    HeldNews,
    HeldTotals,
    Line,
    PeerCounts,
    Unreadable,
    encode,
    link_lost,
    read_held,
    until_gone,
)

log = logging.getLogger("lmfleet.proxy")


class Hub:
    """Facts relayed between workers, and the latest of each kept."""

    def __init__(self, path: Path, store: tuple[str, str] | None = None) -> None:
        """`store`: (URL, name) of the store the workers' replica shares (`--store`):
        the hub is the replica's one voice there for the requests in flight."""
        self.path = path
        self._store = store
        self.nodes: dict[str, dict[str, Any]] = {}
        self.gone: set[str] = set()
        self.fleet: dict[str, Any] | None = None
        self._workers: dict[int, Line] = {}
        self.held = HeldTotals()
        self._told: dict[Line, dict[str, int]] = {}
        """What each worker's line was last told of the others' requests in flight."""
        self._held_by: dict[Line, str] = {}
        """Each worker's id in its `held` messages, by its line."""
        self._answers: dict[tuple[int, int], list[str]] = {}
        self._waits: dict[tuple[int, int], tuple[set[int], anyio.Event]] = {}
        self._tasks: TaskGroup

    @property
    def connected(self) -> int:
        """Workers connected now."""
        return len(self._workers)

    async def serve(self, *, task_status: TaskStatus[None]) -> None:
        listener = await anyio.create_unix_listener(self.path)
        async with listener, anyio.create_task_group() as tg:
            self._tasks = tg
            tg.start_soon(self._share_held)
            if self._store is not None:
                tg.start_soon(self._replica_counts, *self._store)
            task_status.started()
            await listener.serve(self._worker, task_group=tg)

    async def _worker(self, stream: SocketStream) -> None:
        line = Line(stream)
        worker = -1
        async with stream:
            try:
                hello = await line.receive()
                worker = int(hello["worker"])
                self._workers[worker] = line
                snapshot = {"nodes": self.nodes, "gone": sorted(self.gone), "fleet": self.fleet}
                await line.send({"op": "snapshot", **snapshot})
                while True:
                    message = await line.receive()
                    if message["op"] == "held":
                        self._held(line, message)
                    else:
                        await self._handle(worker, message)
            except GONE:
                pass  # the worker ended (or was killed): the supervisor starts another
            except (ValueError, KeyError, TypeError) as exc:
                log.error("hub: worker %d sent what it cannot read: %s", worker, exc)
            finally:
                if self._workers.get(worker) is line:
                    del self._workers[worker]
                for _key, (left, done) in list(self._waits.items()):
                    left.discard(worker)  # a question does not wait for a worker that is gone
                    if not left:
                        done.set()
                self._told.pop(line, None)
                by = self._held_by.pop(line, None)
                if by is not None:
                    self.held.left(by)

    async def _handle(self, worker: int, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "node":  # the parts it carries over what was known (per part, last wins)
            url = message["url"]
            if url not in self.nodes and "entry" not in message["fact"]:
                return  # news of a node removed meanwhile: only an introduction adds one
            self.nodes[url] = {**self.nodes.get(url, {}), **message["fact"]}
            self.gone.discard(url)
        elif op == "gone":
            self.nodes.pop(message["url"], None)
            self.gone.add(message["url"])
        elif op == "fleet":
            self.fleet = message["fact"]
        elif op == "ask":  # gathered beside: the asker's line goes on meanwhile
            self._tasks.start_soon(self._gather, worker, int(message["id"]), str(message["kind"]))
            return
        elif op == "answer":
            key = (int(message["asker"]), int(message["id"]))
            if key in self._waits:
                self._answers[key].append(str(message.get("text", "")))
                left, done = self._waits[key]
                left.discard(worker)
                if not left:
                    done.set()
            return
        await self._relay(worker, message)

    def _held(self, line: Line, message: dict[str, Any]) -> None:
        by, counts, whole = read_held(message)
        self._held_by[line] = by
        self.held.heard(by, counts, whole)

    async def _share_held(self) -> None:
        """Every `SYNC_EVERY`: each worker hears the others' sums that changed for it
        (all of them every `HELD_EVERY`, and in a worker's first message)."""
        told_all = 0.0
        while True:
            await anyio.sleep(SYNC_EVERY)
            now = time.monotonic()
            whole = now - told_all >= HELD_EVERY
            if whole:
                told_all = now
            changed = self.held.take_changed()
            if not changed and not whole:
                continue
            for line in list(self._workers.values()):
                first = line not in self._told
                told = self._told.setdefault(line, {})
                by = self._held_by.get(line)
                counts = self.held.others(by, told, None if whole or first else changed)
                if counts is not None:
                    message = {"op": "held", "by": "hub", "counts": counts, "whole": whole or first}
                    with contextlib.suppress(*GONE):  # a worker gone: its own task cleans up
                        await line.send(message)

    async def _replica_counts(self, url: str, name: str) -> None:
        """With a store: publish the workers' sum as this replica's counts and hear the
        other replicas' (`outside`, in what each worker is told); after a loss, they
        count for nothing until the store is back (each worker's own view of the
        nodes' `/metrics` still carries them)."""
        from lmfleet.proxy.store import StoreLink

        me = uuid.uuid4().hex[:12]  # one name across reconnections
        backoff = Backoff()
        while True:
            link = StoreLink(url, name, facts=False)
            peers = PeerCounts()
            try:
                await link.open()
                backoff.reset()
                async with anyio.create_task_group() as tg:
                    publish = partial(self._publish_totals, link, me, peers)
                    tg.start_soon(until_gone, publish, tg.cancel_scope)
                    await self._hear_replicas(link, me, peers)
                    tg.cancel_scope.cancel()
                log.warning("hub: lost the store's counts; it tries again")
            except BaseException as exc:
                why = link_lost(exc)
                if why is None:
                    raise
                log.warning("hub: lost the store's counts (%r); it tries again", why)
            finally:
                self.held.outside(peers.clear())
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await link.aclose()
            await backoff.pause()

    async def _hear_replicas(self, link: Any, me: str, peers: PeerCounts) -> None:
        """The other replicas' counts, until the store is lost."""
        unreadable = Unreadable("the hub")
        while True:
            try:
                message = await link.receive()
            except GONE:
                return
            if message.get("op") == "held" and message.get("by") != me:
                try:
                    self.held.outside(peers.heard(*read_held(message)))
                except UNREADABLE as exc:
                    unreadable.skip(message, exc)

    async def _publish_totals(self, link: Any, me: str, peers: PeerCounts) -> None:
        """The workers' sum on the store every `SYNC_EVERY` when it changed (all of it
        every `HELD_EVERY`); the other replicas not heard for `HELD_FOR` dropped."""
        news = HeldNews()
        while True:
            await anyio.sleep(SYNC_EVERY)
            now = time.monotonic()
            message = news.tell(me, self.held.totals, now)
            if message is not None:
                await link.publish(message)
            self.held.outside(peers.expire(now))

    async def _relay(self, sender: int, message: dict[str, Any]) -> None:
        data = encode(message)  # once for all workers
        for worker, line in list(self._workers.items()):
            if worker != sender:
                # A worker gone meanwhile: its own task cleans up.
                with contextlib.suppress(*GONE):
                    await line.send_encoded(data)

    async def _gather(self, asker: int, key: int, kind: str) -> None:
        """Ask every other worker `kind`; their answers to the asker once all answered
        (or `SCRAPE_TIMEOUT` passed)."""
        others = {w for w in self._workers if w != asker}
        question = (asker, key)
        done = anyio.Event()
        self._answers[question] = []
        self._waits[question] = (others, done)
        try:
            for worker in list(others):
                line = self._workers.get(worker)
                if line is not None:
                    with contextlib.suppress(*GONE):
                        await line.send({"op": kind, "id": key, "asker": asker})
            if others:
                with anyio.move_on_after(SCRAPE_TIMEOUT):
                    await done.wait()
            line = self._workers.get(asker)
            if line is not None:
                with contextlib.suppress(*GONE):
                    texts = self._answers[question]
                    await line.send({"op": "answered", "id": key, "texts": texts})
        finally:
            self._answers.pop(question, None)
            self._waits.pop(question, None)
