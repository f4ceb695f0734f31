"""What the workers of one `lmfleet serve --workers N` share: the fleet's decisions.

Each worker is a whole proxy: its own fleet, monitor and routing, each node's
load read from the node's own `/metrics` (so N workers route as well together as
one does: docs/benchmarks.md, replicas95). What one worker *decides* must hold for
all: which nodes there are (a registration, a removal), a node put to sleep,
drained or stopped, an ejection verdict, a weight version, a quarantine, the
fleet's version floor. Those are "facts", shared through the hub the supervisor
runs (lmfleet/proxy/hub.py): every `SYNC_EVERY` seconds a worker compares its
registry with what it last shared or heard, publishes the parts that changed, and
applies what the others published (per part, last writer wins, in the link's order). What each
worker observes (health, latency) stays its own: its monitor sees it too; but
each node's last activity (to the second) goes with its facts, so that the one
auto-sleeper (worker 0) does not put to sleep a node the other workers keep busy.
A node's `/metrics` report is read once per interval for all the workers of one
host (`loads`): one worker, picked by a hash of the node's URL
(`NodeRegistry.reads_metrics`), reads it every round and passes it on through the
hub, and the others stand by for that node, reading it only when its latest report
is late (its reader down or far behind: `Monitor._metrics_due`). So each worker
parses its share of a large fleet's reports, not worker 0 all of them.

Beside the facts, each process shares its requests in flight per node (`held`):
the counts that changed every `SYNC_EVERY`, all of them every `HELD_EVERY`. A node's
`/metrics` shows every process's requests, but only as of its last read (up to a
health interval old); between reads, processes that know only their own requests
crowd the same node. With the counts, `least_load` ranks by ours + the peers' (as
they shared them, milliseconds old) + the report's rest (`NodeState.held`). A
peer's counts are dropped when it is not heard for `HELD_FOR` seconds (it died, or
the link is lost; a worker's at once, when the hub sees its line close): the nodes'
reports then carry its requests again.

A status is a decision when it is `sleeping`, `draining`, `stopped` or `ejected`;
leaving one is a decision too (a wakeup, an ejection served). A node removed is
remembered (a tombstone) so that a restarted worker does not bring it back from
its `--node` flags. Only a node's introduction (the first time a process shares
it: its `entry`) adds it where it is unknown; a later fact about a node this
process does not know is dropped, by the hub and the store too. Otherwise a fact
from a process that had not yet heard of a removal (sent in the same few
milliseconds) would bring the node back, everywhere, for good.

An admin route acts once, in the worker that received it; the others see its
outcome as facts. The connection to the hub is a unix socket carrying one JSON
object per line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import ByteStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from lmfleet.errors import LMFleetError, UnknownNodeError
from lmfleet.node.load import NodeLoad, load_of, next_capacity, report_of
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.proxy.state_file import add_entry, entry

if TYPE_CHECKING:
    from lmfleet.surface import FleetSurface

log = logging.getLogger("lmfleet.proxy")

SYNC_EVERY = 0.02
"""Seconds between two comparisons of the registry with what was last shared."""
DECIDED = frozenset(
    {NodeStatus.SLEEPING, NodeStatus.DRAINING, NodeStatus.STOPPED, NodeStatus.EJECTED}
)
MAX_LINE = 64 * 1024 * 1024
"""The longest message (a worker's `/metrics` text, a snapshot of many nodes)."""
GONE = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)
"""What reading or writing a line raises once the other end is gone."""
HELD_EVERY = 1.0
"""Seconds between two messages with all of a process's counts (the ones between
carry what changed)."""
HELD_FOR = 3.0
"""Seconds a peer's counts stand after it was last heard."""
CONNECT_TIMEOUT = 10.0
SCRAPE_TIMEOUT = 2.0


def node_parts(s: NodeState, active: float | None) -> dict[str, Any]:
    """The node's shared parts, each compared on its own between syncs: a process
    publishes only the parts it changed, so one that saw a node wake does not send
    back the weight version it had before another process's update (per part, last
    writer wins). `active`: the whole second of its last activity (for the
    auto-sleeper)."""
    decided = s.status if s.status in DECIDED else None
    return {
        "status": (decided, s.message if decided else ""),
        "weight_version": s.weight_version,
        "quarantine": s.quarantine,
        "ejection": (round(s.ejected_until, 3), s.ejections),
        "cuts": s.cuts,
        "tier": (s.priority, s.speed),
        "active": None if active is None else int(active),
    }


def node_fact(
    s: NodeState, active: float | None, parts: Iterable[str], *, intro: bool
) -> dict[str, Any]:
    """The `parts` of a node as shared (an ejection as the seconds left; the last
    activity as the seconds since); an introduction carries the node's entry too, to
    add it where it is unknown (and only an introduction adds a node: see the module
    docstring)."""
    now = time.monotonic()
    values: dict[str, Any] = {
        "status": {"status": s.status.value, "message": s.message},
        "weight_version": s.weight_version,
        "quarantine": s.quarantine,
        "ejection": {"for": max(0.0, s.ejected_until - now), "count": s.ejections},
        "cuts": s.cuts,
        "tier": {"priority": s.priority, "speed": s.speed},
        "active": None if active is None else max(0.0, now - active),
    }
    fact = {part: values[part] for part in parts}
    return {"entry": entry(s), **fact} if intro else fact


def apply_fact(state: NodeState, fact: dict[str, Any], held: bool = False) -> NodeState:
    """`state` with the parts of a fact another process published. A status is taken
    when it is a decision, or leaves one this process holds, unless a command of this
    process is running on the node (`held`: its own decision stands meanwhile)."""
    changes: dict[str, Any] = {}
    if "weight_version" in fact:
        changes["weight_version"] = int(fact["weight_version"])
    if "quarantine" in fact:
        changes["quarantine"] = str(fact["quarantine"])
    if "ejection" in fact:
        changes["ejected_until"] = time.monotonic() + float(fact["ejection"]["for"])
        changes["ejections"] = int(fact["ejection"]["count"])
    if "cuts" in fact:
        changes["cuts"] = max(state.cuts, int(fact["cuts"]))
    if "tier" in fact:
        if fact["tier"].get("priority") is not None:
            changes["priority"] = int(fact["tier"]["priority"])
        changes["speed"] = fact["tier"].get("speed")
    if "status" in fact and not held:
        status = NodeStatus(fact["status"]["status"])
        if status in DECIDED or state.status in DECIDED:
            changes["status"], changes["message"] = status, str(fact["status"]["message"])
    return state.evolve(**changes) if changes else state


def shared_load(load: NodeLoad) -> dict[str, Any]:
    """A node's report as a worker shares it with its siblings: its fields, when it
    was read, and the proxy's requests on the node then (the reader's and its peers':
    the report's rest is other clients')."""
    return {
        "at": load.read_at,
        "ours": load.local_inflight + load.peer_inflight,
        "fresh_for": load.fresh_for,
        "report": report_of(load),
    }


def take_load(shared: dict[str, Any], read_at: float, state: NodeState) -> NodeState:
    """`state` with a sibling's report of it, unless its own is as new, or it is not
    healthy here (the monitor keeps loads of healthy nodes only). The pace is
    reckoned from this worker's previous report, as for a report it reads."""
    old = state.load
    if state.status is not NodeStatus.HEALTHY or (old is not None and old.read_at >= read_at):
        return state
    load = load_of(
        {k: float(v) for k, v in shared["report"].items()},
        read_at=read_at,
        peer_inflight=int(shared["ours"]),
        fresh_for=float(shared["fresh_for"]),
        previous=old,
    )
    return state.evolve(load=load, capacity=next_capacity(state.capacity, load))


def encode(message: dict[str, Any]) -> bytes:
    """A message as one line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class Line:
    """One JSON object per line over a byte stream."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._sending = anyio.Lock()  # several tasks send: one message at a time

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_encoded(encode(message))

    async def send_encoded(self, data: bytes) -> None:
        """A message `encode`d before (the hub relays one to many)."""
        async with self._sending:
            await self.stream.send(data)

    async def receive(self) -> dict[str, Any]:
        raw = await self._reader.receive_until(b"\n", MAX_LINE)
        message = json.loads(raw)
        if not isinstance(message, dict):
            raise ValueError(f"not a message: {raw[:80]!r}")
        return message


class Link(Protocol):
    """How facts travel between the processes of one proxy: the supervisor's hub
    (`HubLink`, `--workers`) or a store (`lmfleet/proxy/store.py`, replicas)."""

    kind: str

    async def open(self) -> dict[str, Any]:
        """Connect; the snapshot: `nodes` (url -> fact), `gone` (urls), `fleet`."""
        ...

    async def publish(self, message: dict[str, Any]) -> None: ...

    async def receive(self) -> dict[str, Any]:
        """The next fact or question from another process; `GONE` once disconnected."""
        ...

    async def answer(self, question: dict[str, Any], text: str) -> None: ...

    async def ask(self, kind: str) -> list[str]:
        """Ask every other process `kind` ("scrape", "sync"); their answers (bounded)."""
        ...

    async def beside(self) -> None:
        """What the link runs while connected (a store's presence), or nothing."""
        ...

    async def aclose(self) -> None: ...


class HubLink:
    """A worker's line to its supervisor's hub (lmfleet/proxy/hub.py)."""

    kind = "hub"

    def __init__(self, path: Path, worker: int) -> None:
        self._path = path
        self._worker = worker
        self._line: Line | None = None
        self._asked: dict[int, anyio.Event] = {}
        self._answers: dict[int, list[str]] = {}
        self._next = 0

    async def open(self) -> dict[str, Any]:
        with anyio.fail_after(CONNECT_TIMEOUT):
            stream = await anyio.connect_unix(self._path)
        self._line = Line(stream)
        await self._line.send({"op": "hello", "worker": self._worker})
        with anyio.fail_after(CONNECT_TIMEOUT):
            return await self._line.receive()

    async def publish(self, message: dict[str, Any]) -> None:
        assert self._line is not None
        await self._line.send(message)

    async def receive(self) -> dict[str, Any]:
        assert self._line is not None
        while True:
            message = await self._line.receive()
            if message.get("op") != "answered":
                return message
            key = int(message["id"])
            if key in self._asked:
                self._answers[key] = list(message["texts"])
                self._asked[key].set()

    async def answer(self, question: dict[str, Any], text: str) -> None:
        reply = {"op": "answer", "id": question["id"], "asker": question["asker"]}
        await self.publish({**reply, "text": text})

    async def ask(self, kind: str) -> list[str]:
        key = self._next = self._next + 1
        done = self._asked[key] = anyio.Event()
        try:
            await self.publish({"op": "ask", "kind": kind, "id": key})
            with anyio.move_on_after(SCRAPE_TIMEOUT):
                await done.wait()
            return self._answers.pop(key, [])
        finally:
            self._asked.pop(key, None)

    async def beside(self) -> None:
        await anyio.sleep_forever()

    async def aclose(self) -> None:
        if self._line is not None:
            await self._line.stream.aclose()


class SharedState:
    """One process's side of the shared facts (see the module docstring)."""

    def __init__(
        self,
        fleet: FleetSurface,
        link: Link,
        worker: int = 0,
        siblings: HubLink | None = None,
        workers: int = 1,
    ) -> None:
        """`worker` is this process's index of `workers` (`lmfleet serve --workers`)."""
        self._fleet = fleet
        self._link = link
        self.worker = worker
        self._siblings = siblings
        """With `--workers` and `--store`: the hub, for what this proxy's workers
        share among themselves (one `/metrics`) and the requests in flight (the hub
        speaks for all of them on the store); the facts go through the store, to every
        worker of every replica alike."""
        self._siblings_up = False
        self._synced: dict[str, dict[str, Any]] = {}
        self._fleet_view: tuple[Any, ...] | None = None
        self.render: Callable[[], bytes] | None = None
        """This worker's own `/metrics` text (set by the app), for another's scrape."""
        self.connected = False
        self.problem = ""
        """Why it is not connected now (empty while it is)."""
        self._id = uuid.uuid4().hex[:12]
        self._news = HeldNews()
        """Our counts as last shared (`held` messages)."""
        self._loads_known: dict[str, float] = {}
        """Each node's newest report (`read_at`) this worker shared or heard."""
        if workers > 1:  # each reads its share of the nodes' reports, and hears the rest
            fleet.registry.metrics_share = (worker, workers)
        self._peers = PeerCounts()
        self._unreadable = Unreadable(f"worker {worker}")

    @property
    def via(self) -> str:
        return self._link.kind

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Connect, take the snapshot, then share both ways; after a loss, keep serving
        with what is known and connect again (the first try, too, never stops the
        proxy from starting)."""
        async with anyio.create_task_group() as tg:
            if self._siblings is not None:
                tg.start_soon(self._answer_siblings, self._siblings)
            await self._share(task_status=task_status)

    async def _share(self, *, task_status: TaskStatus[None]) -> None:
        started = False
        backoff = Backoff()
        while True:
            try:
                snapshot = await self._link.open()
                self._take(snapshot)
                self.connected, self.problem = True, ""
                backoff.reset()
                self._fleet.registry.barrier = self.flush
                if not started:
                    started = True
                    task_status.started()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(until_gone, self._publish_changes, tg.cancel_scope)
                    tg.start_soon(until_gone, self._link.beside, tg.cancel_scope)
                    await self._receive()
                    tg.cancel_scope.cancel()
                self.problem = "disconnected"
            except BaseException as exc:
                why = link_lost(exc)
                if why is None:
                    raise
                self.problem = f"{type(why).__name__}: {why}"
            finally:
                self.connected = False
                self._fleet.registry.barrier = None
                if self._siblings is None:  # else the counts go through the hub
                    self._forget_peers()
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self._link.aclose()
            log.error(
                "worker %d lost the %s (%s): it keeps serving what it knows, and tries again",
                self.worker,
                self.via,
                self.problem,
            )
            if not started:
                started = True
                task_status.started()
            await backoff.pause()

    def _take(self, snapshot: dict[str, Any]) -> None:
        """Apply a snapshot; what this process knows and it lacks is published next."""
        self._synced.clear()
        self._fleet_view = None
        for url in snapshot.get("gone") or ():
            self._forget(url)
        for url, fact in (snapshot.get("nodes") or {}).items():
            try:
                self._apply(url, fact)
            except UNREADABLE as exc:  # kept in the store: it would fail every connection
                self._unreadable.skip(fact, exc)
        if snapshot.get("fleet"):
            try:
                self._apply_fleet(snapshot["fleet"])
            except UNREADABLE as exc:
                self._unreadable.skip(snapshot["fleet"], exc)

    async def _receive(self) -> None:
        while True:
            try:
                message = await self._link.receive()
            except GONE:
                return
            try:
                await self._take_message(message)
            except GONE:
                return
            except UNREADABLE as exc:
                self._unreadable.skip(message, exc)

    async def _take_message(self, message: dict[str, Any]) -> None:
        """Apply one message of the others (unknown kinds are ignored: a newer
        version's)."""
        op = message.get("op")
        if op == "node":
            self._apply(message["url"], message["fact"])
        elif op == "gone":
            self._forget(message["url"])
        elif op == "fleet":
            self._apply_fleet(message["fact"])
        elif op == "held":
            self._heard(message)
        elif op == "loads":
            self._heard_loads(message)
        elif op in ("scrape", "sync"):  # another process asks all
            # A sync is answered here, after every fact sent before it was applied.
            await self._answer(self._link, message)

    async def _answer(self, link: Link, question: dict[str, Any]) -> None:
        text = self.render().decode() if question["op"] == "scrape" and self.render else ""
        await link.answer(question, text)

    async def _answer_siblings(self, hub: HubLink) -> None:
        """Beside a store: stay on the hub to answer the other workers' scrapes (and to
        ask them, `scrape_others`), and to share the requests in flight (the hub sums
        its workers' and speaks for them on the store); connect again after a loss."""
        backoff = Backoff()
        while True:
            try:
                await hub.open()  # its snapshot is empty: facts go through the store
                self._siblings_up = True
                backoff.reset()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(until_gone, partial(self._share_beside, hub), tg.cancel_scope)
                    while True:
                        message = await hub.receive()
                        if message.get("op") in ("scrape", "sync"):
                            await self._answer(hub, message)
                        elif message.get("op") == "held":
                            self._heard(message)
                        elif message.get("op") == "loads":
                            self._heard_loads(message)
            except BaseException as exc:
                why = link_lost(exc)
                if why is None:
                    raise
                log.warning("worker %d lost the hub (%r); it tries again", self.worker, why)
            finally:
                self._siblings_up = False
                self._forget_peers()
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await hub.aclose()
            await backoff.pause()

    async def _share_beside(self, hub: HubLink) -> None:
        """Beside a store: our counts and the reports we read over the hub, every
        `SYNC_EVERY`."""
        while True:
            nodes = {s.url: s for s in self._fleet.registry.snapshot()}
            await self._share_held(hub, nodes)
            await self._share_loads(hub, nodes)
            await anyio.sleep(SYNC_EVERY)

    async def _publish_changes(self) -> None:
        while True:
            await self._publish_once()
            await anyio.sleep(SYNC_EVERY)

    async def _publish_once(self) -> None:
        """Publish what changed in the registry since it was last shared or heard.
        The messages are all made before the first is sent: a removal heard while
        they go must not make a node this process knew look new (an introduction)."""
        registry = self._fleet.registry
        nodes = {s.url: s for s in registry.snapshot()}
        messages: list[dict[str, Any]] = []
        for url, state in nodes.items():
            active = registry.last_active(url)
            parts = node_parts(state, active)
            synced = self._synced.get(url)
            changed = [k for k, v in parts.items() if synced is None or synced.get(k) != v]
            if changed:
                self._synced[url] = parts
                fact = node_fact(state, active, changed, intro=synced is None)
                messages.append({"op": "node", "url": url, "fact": fact})
        for url in [u for u in self._synced if u not in nodes]:
            del self._synced[url]
            messages.append({"op": "gone", "url": url})
        for message in messages:
            await self._link.publish(message)
        fleet = (registry.weight_version, registry.version_floor)
        if fleet != self._fleet_view:
            self._fleet_view = fleet
            await self._link.publish(
                {"op": "fleet", "fact": {"weight_version": fleet[0], "floor": fleet[1]}}
            )
        if self._siblings is None:  # beside a store, the hub carries them (`_share_beside`)
            await self._share_held(self._link, nodes)
            if self.via == "hub":
                await self._share_loads(self._link, nodes)

    async def _share_held(self, link: Link, nodes: dict[str, NodeState]) -> None:
        """Send our counts that changed (all of them every `HELD_EVERY`), and drop
        the peers not heard for `HELD_FOR`."""
        now = time.monotonic()
        message = self._news.tell(self._id, {url: s.inflight for url, s in nodes.items()}, now)
        if message is not None:
            await link.publish(message)
        self._set_peers(self._peers.expire(now))

    async def _share_loads(self, hub: Link, nodes: dict[str, NodeState]) -> None:
        """The nodes' reports this worker read since the last tick (not those it heard),
        for its siblings: one `/metrics` read per node and interval serves them all
        (worker 0's, while the others' monitors stand by)."""
        loads: dict[str, Any] = {}
        known = self._loads_known
        for url, state in nodes.items():
            load = state.load
            if load is not None and load.read_at > known.get(url, -math.inf):
                known[url] = load.read_at
                loads[url] = shared_load(load)
        for url in known.keys() - nodes.keys():
            del known[url]
        if loads:
            await hub.publish({"op": "loads", "loads": loads})

    def _heard_loads(self, message: dict[str, Any]) -> None:
        """A sibling's reports: each taken where it is newer than the node's own (the
        workers share one host, so one monotonic clock)."""
        registry = self._fleet.registry
        for url, shared in message["loads"].items():
            read_at = float(shared["at"])
            self._loads_known[url] = max(read_at, self._loads_known.get(url, -math.inf))
            registry.modify(url, partial(take_load, shared, read_at))

    def _heard(self, message: dict[str, Any]) -> None:
        self._set_peers(self._peers.heard(*read_held(message)))

    def _forget_peers(self) -> None:
        """The link that carried the counts is lost: the peers' count for nothing (the
        nodes' reports count their requests again), and our next message is whole."""
        self._set_peers(self._peers.clear())
        self._news = HeldNews()

    def _set_peers(self, sums: dict[str, int]) -> None:
        """Each node's `peers` where the sum changed."""
        registry = self._fleet.registry
        for url, peers in sums.items():
            registry.modify(url, partial(NodeState.evolve, peers=peers))

    async def flush(self) -> None:
        """Share what changed now and wait (bounded) until every other process applied
        it: a decision that must be known before it acts (a weight update's cut, which
        the others' followed generations must read as a cut to continue)."""
        if not self.connected:
            return
        with contextlib.suppress(*GONE):
            await self._publish_once()
            await self._link.ask("sync")

    def _apply(self, url: str, fact: dict[str, Any]) -> None:
        registry = self._fleet.registry
        new = False
        try:
            registry.get(url)
        except UnknownNodeError:
            if "entry" not in fact:  # news of a node this process removed (or never had)
                return
            apply_fact(NodeState(url), fact)  # a fact it cannot read adds no node
            try:
                add_entry(self._fleet, fact["entry"], f"shared by another {self._peer}")
            except (LMFleetError, KeyError, TypeError, ValueError) as exc:
                log.warning("cannot add the shared node %s: %s", url, exc)
                return
            new = True
        held = registry.is_held(url)
        state = registry.modify(url, lambda s: apply_fact(s, fact, held))
        if state is None:
            return
        if fact.get("active") is not None:
            registry.saw_activity(state.url, time.monotonic() - float(fact["active"]))
        # What was heard is not to be echoed: the parts it carried (all, for a node
        # it just added), and not the parts this process changed and has yet to send.
        parts = node_parts(state, registry.last_active(state.url))
        synced = self._synced.get(state.url)
        if new or synced is None:
            self._synced[state.url] = parts
        else:
            synced.update({k: parts[k] for k in fact if k in parts})

    @property
    def _peer(self) -> str:
        return "worker" if self.via == "hub" else "replica"

    def _forget(self, url: str) -> None:
        self._synced.pop(url, None)
        with contextlib.suppress(UnknownNodeError):
            self._fleet.remove_node(url)

    def _apply_fleet(self, fact: dict[str, Any]) -> None:
        registry = self._fleet.registry
        registry.weight_version = int(fact["weight_version"])
        floor = fact.get("floor")
        registry.version_floor = None if floor is None else int(floor)
        self._fleet_view = (registry.weight_version, registry.version_floor)

    async def scrape_others(self) -> list[str]:
        """The other workers' `/metrics` texts (those that answered in time); none for
        replicas, whose `/metrics` are each their own."""
        link: Link
        if self._siblings is not None:
            link, up = self._siblings, self._siblings_up
        else:
            link, up = self._link, self.connected and self.via == "hub"
        if not up:
            return []
        try:
            return await link.ask("scrape")
        except GONE:
            return []


class Backoff:
    """The pauses between a lost link's reconnections: `first` seconds, doubling up to
    `longest`, and from `first` again once connected (a store restarted for a minute
    is not asked ten times a second meanwhile, and is found within `longest` after)."""

    def __init__(self, first: float = 0.5, longest: float = 5.0) -> None:
        self._first, self._longest = first, longest
        self._next = first

    def reset(self) -> None:
        self._next = self._first

    async def pause(self) -> None:
        await anyio.sleep(self._next)
        self._next = min(self._next * 2, self._longest)


LOST = (*GONE, OSError, TimeoutError, ValueError, KeyError)
"""What ends a link (the loop around it connects again), rather than the proxy."""


def link_lost(exc: BaseException) -> BaseException | None:
    """The exception that says why a link was lost, if `exc` is one of `LOST` or a task
    group's group of them only (anyio's task groups raise every error, even one, as a
    group: caught as itself, such an error would end the proxy, not the link)."""
    group = getattr(exc, "exceptions", None)  # a BaseExceptionGroup (3.10: the backport's)
    if isinstance(group, tuple) and group:
        found = [link_lost(e) for e in group]
        return None if None in found else found[0]
    return exc if isinstance(exc, LOST) else None


async def until_gone(work: Callable[[], Awaitable[None]], connection: anyio.CancelScope) -> None:
    """Run `work` beside a link's receiving; when it finds the link gone, end the
    connection (the loop around it connects again)."""
    try:
        await work()
    except GONE:
        connection.cancel()


UNREADABLE = (KeyError, TypeError, ValueError, AttributeError)
"""What reading a message that is not as this version writes them raises."""


class Unreadable:
    """Messages from the store that this process cannot read: a replica of another
    lmfleet version during a rolling upgrade, or something else publishing on the
    channel. Each is skipped: dropping the link for one would reconnect (a snapshot,
    a second without the counts) on every message such a replica sends. Logged the
    first time and then at most once a minute, with the count."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._count = 0
        self._next_log = -math.inf

    def skip(self, message: object, exc: BaseException) -> None:
        self._count += 1
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + 60.0
            log.warning(
                "%s skipped a message it cannot read (%d so far: a replica of another "
                "lmfleet version, or not lmfleet's): %s %s in %.200r",
                self._where,
                self._count,
                type(exc).__name__,
                exc,
                message,
            )


def read_held(message: dict[str, Any]) -> tuple[str, dict[str, int], bool]:
    """A `held` message's sender, counts per node and whether they are all of them."""
    counts = {str(url): int(n) for url, n in message["counts"].items()}
    return str(message["by"]), counts, bool(message.get("whole"))


class HeldNews:
    """What one process (or a hub, for its replica) last told the others of its
    requests in flight, and the `held` message each tick calls for: the counts that
    changed (a node no longer counted as 0), all of them every `HELD_EVERY`."""

    def __init__(self) -> None:
        self._told: dict[str, int] = {}
        self._at = 0.0

    def tell(self, by: str, counts: dict[str, int], now: float) -> dict[str, Any] | None:
        """The message for `counts` now, as `by`; None when there is nothing new."""
        whole = now - self._at >= HELD_EVERY
        told = self._told
        if whole:
            changed = counts
        else:
            urls = told.keys() | counts.keys()
            changed = {u: counts.get(u, 0) for u in urls if told.get(u) != counts.get(u)}
        if not changed and not whole:
            return None
        self._told = counts
        if whole:
            self._at = now
        return {"op": "held", "by": by, "counts": changed, "whole": whole}


class PeerCounts:
    """The peers' requests in flight per node, as each last shared them, and their sum
    per node. Each change returns the nodes whose sum changed (url -> new sum): a
    message costs what it changed, not the fleet's size times the peers."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}
        self._heard: dict[str, float] = {}
        self._sums: dict[str, int] = {}

    def heard(
        self, peer: str, counts: dict[str, int], whole: bool, now: float | None = None
    ) -> dict[str, int]:
        """A peer's counts: all of them (`whole`: a node it left out has none), or
        those that changed."""
        self._heard[peer] = time.monotonic() if now is None else now
        known = self._counts.setdefault(peer, {})
        deltas: dict[str, int] = {}
        if whole:
            for url in known.keys() - counts.keys():
                deltas[url] = -known.pop(url)
        for url, n in counts.items():
            delta = n - known.get(url, 0)
            if delta:
                deltas[url] = delta
                known[url] = n
        return self._add(deltas)

    def expire(self, now: float) -> dict[str, int]:
        """Drop the peers not heard for `HELD_FOR` seconds."""
        changed: dict[str, int] = {}
        for peer in [p for p, heard in self._heard.items() if now - heard > HELD_FOR]:
            changed |= self.forget(peer)
        return changed

    def forget(self, peer: str) -> dict[str, int]:
        """Drop one peer (it is gone)."""
        self._heard.pop(peer, None)
        return self._add({url: -n for url, n in self._counts.pop(peer, {}).items()})

    def of(self, peer: str | None) -> dict[str, int]:
        """One peer's counts as it last shared them (none for an unknown one)."""
        return self._counts.get(peer, {}) if peer is not None else {}

    @property
    def sums(self) -> dict[str, int]:
        """Every peer's counts summed per node (0 for a node all of them left)."""
        return self._sums

    def clear(self) -> dict[str, int]:
        """Forget every peer (the link is lost)."""
        changed = {url: 0 for url, n in self._sums.items() if n}
        self._counts.clear()
        self._heard.clear()
        self._sums.clear()
        return changed

    def _add(self, deltas: dict[str, int]) -> dict[str, int]:
        for url, delta in deltas.items():
            self._sums[url] = self._sums.get(url, 0) + delta
        return {url: self._sums[url] for url in deltas}


class HeldTotals:
    """The hub's sum of every worker's requests in flight per node, and what each
    worker is told of it: the *others'* sum per node, in one message a tick (a
    relay of each worker's counts to each other worker was N x (N - 1) messages a
    tick; this is N, each carrying only the sums that changed for its worker).

    The workers are the hub's peers (`PeerCounts`), known by the id their `held`
    messages carry (`by`); what a worker was last told is the caller's to keep
    (`told`), one dict per connection. With a store, the other replicas' sums
    (`outside`) are part of what every worker is told, and the workers' own sum
    (`totals`) is what the replica publishes."""

    def __init__(self) -> None:
        self._workers = PeerCounts()
        self._outside: dict[str, int] = {}
        self._dirty: set[str] = set()

    @property
    def totals(self) -> dict[str, int]:
        """Every worker's requests in flight summed per node (nodes with none left out)."""
        return {url: n for url, n in self._workers.sums.items() if n}

    def outside(self, sums: dict[str, int]) -> None:
        """The other replicas' sums for the nodes in `sums` (0: none any more)."""
        for url, n in sums.items():
            if self._outside.get(url, 0) != n:
                if n:
                    self._outside[url] = n
                else:
                    self._outside.pop(url, None)
                self._dirty.add(url)

    def heard(self, by: str, counts: dict[str, int], whole: bool) -> None:
        """A worker's counts: all of them (`whole`: a node left out has none), or
        those that changed."""
        self._dirty.update(self._workers.heard(by, counts, whole))

    def left(self, by: str) -> None:
        """A worker is gone: its requests in flight ended with it."""
        self._dirty.update(self._workers.forget(by))

    def take_changed(self) -> set[str]:
        """The nodes whose sum changed since the last call."""
        changed, self._dirty = self._dirty, set()
        return changed

    def others(
        self, by: str | None, told: dict[str, int], changed: set[str] | None
    ) -> dict[str, int] | None:
        """What to tell worker `by` (None: it shared nothing yet) of the others' sums:
        every node's that is not 0 (`changed` None: a whole message), else those of
        `changed` that differ from what it was `told` (updated here); None for
        nothing to tell."""
        own, totals, outside = self._workers.of(by), self._workers.sums, self._outside
        if changed is None:
            urls = totals.keys() | outside.keys()
            sums = {u: totals.get(u, 0) - own.get(u, 0) + outside.get(u, 0) for u in urls}
            told.clear()
            told.update((url, n) for url, n in sums.items() if n)
            return dict(told)
        news: dict[str, int] = {}
        for url in changed:
            n = totals.get(url, 0) - own.get(url, 0) + outside.get(url, 0)
            if told.get(url, 0) != n:
                news[url] = n
                if n:
                    told[url] = n
                else:
                    told.pop(url, None)
        return news or None
