"""NodeRegistry: the only shared mutable state in a fleet.

Every node is one immutable `NodeState`; a change replaces it under one lock. The
transports (in callers' threads and event loops), the monitor (in the fleet's
thread) and the proxy all go through here. Critical sections are a few dict
operations; no I/O ever happens under the lock.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import math
import random
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from urllib.parse import urlsplit

from lmfleet.config import NodeOptions, OutlierOptions
from lmfleet.doorbell import Doorbell
from lmfleet.errors import ConfigError, UnknownNodeError
from lmfleet.node import outliers
from lmfleet.node.names import model_names
from lmfleet.node.outliers import Outcome
from lmfleet.node.state import NodeRole, NodeState, NodeStatus
from lmfleet.priority import effective, rank
from lmfleet.routing.base import (
    Candidate,
    Decision,
    RequestInfo,
    Strategy,
    as_base_strategy,
    explain_pick,
)
from lmfleet.routing.tiers import DEFAULT_PRIORITY, TierChoice, choose_tier

log = logging.getLogger("lmfleet")

QUEUE_HEADROOM = 2
"""Background requests a full node may still hold in its queue (lmfleet/priority.py):
enough that a slot freed between two polls of the waiting requests is taken at once
(a node idle until the next poll would slow the batch), few enough that a request
of a higher priority meets a short queue."""

EWMA_ALPHA = 0.2
"""Weight of the newest sample: about the last ten requests shape a node's latency."""

LATENCY_WINDOW = 64
"""Recent latencies kept per node for percentiles (the dashboard's p50)."""


SERVING_SHAPES = 64
"""How many request shapes (model, role, engine, weight version asks, the fleet's
floor) `NodeRegistry` keeps eligible nodes for: more are cleared, not grown."""

URL_FORM = "http(s)://host[:port], e.g. http://127.0.0.1:23333 or http://[::1]:23333"
"""The node URL form every error about a bad node URL shows."""

_HOST = re.compile(r"[A-Za-z0-9._-]+")
"""What a host name may hold (an IPv6 address goes in brackets instead)."""


def normalize_url(url: str) -> str:
    """`http://host:port` form used as a node's identity.

    Checked here, once, for everyone who adds a node (`attach`, `add_node`, the
    proxy's /nodes/add): a typo such as `not a url` or `host::` would otherwise
    become a node that can never be reached, and show up only later as an
    unhealthy row with a puzzling connection error.
    """
    if not isinstance(url, str):
        raise ConfigError(f"node URL must be a string {URL_FORM}; got {url!r}")
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    text = text.rstrip("/").removesuffix("/v1")
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # a bad [IPv6] literal
        raise _bad_url(url, str(exc)) from exc
    try:
        port = parts.port
    except ValueError as exc:
        raise _bad_url(url, "invalid port: give a number from 1 to 65535") from exc
    if parts.scheme not in ("http", "https"):
        raise _bad_url(url, f"the scheme must be http or https, not {parts.scheme!r}")
    host = parts.hostname
    if not host:
        raise _bad_url(url, "it has no host")
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError as exc:
            raise _bad_url(url, f"{host!r} in brackets is not an IPv6 address") from exc
    elif not _HOST.fullmatch(host):
        raise _bad_url(url, f"the host {host!r} may hold only letters, digits, '-', '.' and '_'")
    if port == 0 or parts.netloc.endswith(":"):
        raise _bad_url(url, "invalid port: give a number from 1 to 65535")
    if parts.path or parts.query or parts.fragment:
        raise _bad_url(url, "it has a path or query (give the server's root, not an endpoint)")
    return text


def _bad_url(url: str, why: str) -> ConfigError:
    return ConfigError(f"invalid node URL {url!r}: {why}; expected {URL_FORM}")


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + EWMA_ALPHA * (sample - old)


class _Window:
    """A node's last answers (True = failed) with a running count of failures."""

    __slots__ = ("answers", "failed")

    def __init__(self, size: int) -> None:
        self.answers: deque[bool] = deque(maxlen=size)
        self.failed = 0

    def add(self, failed: bool) -> None:
        if len(self.answers) == self.answers.maxlen:
            self.failed -= self.answers[0]
        self.answers.append(failed)
        self.failed += failed

    def clear(self) -> None:
        self.answers.clear()
        self.failed = 0


class NodeRegistry:
    """Node snapshots by URL, behind one lock.

    A node's identity is its `normalize_url` form: every method takes any spelling
    of the URL that `add` would accept ("host:port", a trailing slash or "/v1").
    """

    def __init__(
        self,
        outliers: OutlierOptions | None = None,
        *,
        weight_version: int = 0,
        spill_margin: float = 2.0,
        aliases: Mapping[str, tuple[str, ...]] | None = None,
        unify_models: bool = False,
    ) -> None:
        self._lock = threading.Lock()
        self.weight_version = weight_version
        """The weight version a node starts with (`FleetOptions.weight_version`)."""
        self.version_floor: int | None = None
        """While set, only nodes of at least this weight version are routed to: set when
        an update that does not allow mixing starts (weights/session.py)."""
        self.barrier: Callable[[], Awaitable[None]] | None = None
        """Awaited after a decision other processes must know before it acts on a
        node (a weight update's cut): the shared state of `lmfleet serve --workers`
        (lmfleet/proxy/shared.py) sets it; None in one process."""
        self.metrics_share: tuple[int, int] | None = None
        """In a worker of `lmfleet serve --workers`: (its index, how many workers).
        Each node's `/metrics` is read by one worker and the report shared
        (lmfleet/proxy/shared.py), each worker reading its share of the nodes
        (`reads_metrics`); the others read it only when its latest report is late
        (`Monitor._metrics_due`). None: this process reads every node's."""
        self.doorbell = Doorbell()
        """Rung when a node becomes able to take requests: waiting ones look at once."""
        self._nodes: dict[str, NodeState] = {}
        self._held: set[str] = set()
        self._models: list[str] = []
        self._outliers = outliers or OutlierOptions()
        # Traffic statistics for dashboards, kept beside the snapshots: O(1) per request.
        self._recent: dict[str, deque[float]] = {}
        self._tokens: dict[str, int] = {}
        self._answers: dict[str, _Window] = {}
        self._next_readmit = math.inf  # earliest `ejected_until` of any ejected node
        self.panics = 0
        """Requests routed to ejected nodes because no healthy one was left (panic mode)."""
        # Idle auto-sleep reads when each node last saw traffic (a lease, a release, or
        # becoming healthy): one float per node, written where the lock is held anyway.
        self._active: dict[str, float] = {}
        self._waiting = 0
        self._waiters: dict[int, tuple[float, str | None]] = {}  # ticket -> (rank, model)
        self._tickets = itertools.count(1)
        self.held_back = 0
        """Times a background request found every node full and waited (lmfleet/priority.py)."""
        self._bringing: dict[int, int] = {}  # weight version -> updates bringing it now
        self._sessions: dict[str, tuple[str, int | str]] = {}  # request id -> (node, engine's id)
        self.spill_margin = spill_margin
        """How much lower a lower tier's expected wait must be for it to take a request
        (`RoutingOptions.spill_margin`; lmfleet/routing/tiers.py)."""
        self._tiered = False  # whether the nodes have more than one priority
        self._aliases = dict(aliases or {})
        self._unify = unify_models
        self.names = model_names((), self._aliases, unify=unify_models)
        """Which served names each requested model may go to (lmfleet/node/names.py)."""
        self._accepted: list[str] = sorted(self._aliases)
        self._draws = random.Random()
        self._serving_cache: dict[tuple[object, ...], tuple[list[NodeState], dict[str, int]]] = {}
        """`_serving`'s answers by request shape: (the nodes, each one's position). A
        node's new snapshot replaces its entry in place (`_put`); a change to what
        decides eligibility (`_shape`), or to the fleet's members or names, clears it."""
        self.spills: dict[str, int] = {"health": 0, "load": 0}
        """Requests sent below the best tier, by reason (lmfleet/routing/tiers.py)."""
        self.wake_asked = False
        """A request went to a worse tier while a better one sleeps: the router asks the
        fleet to wake one (`TierChoice.better_asleep`), then clears it."""

    def reads_metrics(self, url: str) -> bool:
        """Whether this process reads `url`'s `/metrics` every round (`metrics_share`):
        a hash of the URL picks the worker, the same in every worker with no
        agreement needed, and spreads a large fleet's reports (each a parse of up to
        ~100 KB of Prometheus text for a vLLM node) evenly over the workers."""
        if self.metrics_share is None:
            return True
        index, count = self.metrics_share
        return zlib.crc32(url.encode()) % count == index

    def _models_changed(self) -> None:
        # Called under the lock whenever membership or a node's models change, so
        # that the per-request `models()` costs no more than a list copy.
        self._serving_cache.clear()
        self._models = sorted({m for s in self._nodes.values() for m in s.models})
        if self._aliases or self._unify:
            names = model_names(self._models, self._aliases, unify=self._unify)
            for why in set(names.ambiguous) - set(self.names.ambiguous):
                log.warning("unify_models: %s", why)
            self.names = names
            self._accepted = sorted({*self._models, *self._aliases})
        else:
            self._accepted = self._models
        self._tiered = len({s.priority for s in self._nodes.values()}) > 1

    # -- membership ---------------------------------------------------------------

    def add(
        self,
        url: str,
        *,
        api_key: str | None = None,
        models: tuple[str, ...] = (),
        role: NodeRole = NodeRole.HYBRID,
        launched: bool = False,
        registered: bool = False,
        speed: float | None = None,
        priority: int | None = None,
        weight_version: int | None = None,
        origin: str | None = None,
        headers: tuple[tuple[str, str], ...] | None = None,
        options: NodeOptions | None = None,
        engine: str | None = None,
    ) -> NodeState:
        """Add a node as `starting`, or restart an existing one's checks (counters kept).

        A node re-added while healthy or asleep keeps that status: both are what the
        node itself said, and the monitor's next probe sees a change (a node that
        restarted awake). Sending a sleeping node back to `starting` would take it out
        of wake-on-demand's reach until that probe, and log a flap for every node a
        proxy reloads from its state file that its flags had already added.

        `launched`: this fleet started its process; `registered`: it announced itself
        (`/nodes/add`). Either way it is known to be coming up (`NodeState.announced`).
        `speed`: its relative speed, if the operator gave one (a re-add keeps the old).
        `priority`: its tier, higher preferred (default 0; a re-add keeps the old).
        `headers`, `options`: its own extra headers and settings (`NodeOptions`; a
        re-add without them keeps the old). `engine`: its engine's profile name when
        given (None: recognised when it first answers; a re-add keeps the old).
        `weight_version`: the version it serves, when known (default: the fleet's
        initial one; a re-add keeps the old). `origin`: who added it, as the log line
        says it ("registered itself", "reloaded from FILE", ...; default from the flags).
        """
        url = normalize_url(url)
        with self._lock:
            old = self._nodes.get(url)
            if old is None:
                state = NodeState(
                    url=url,
                    models=models,
                    role=role,
                    api_key=api_key,
                    launched=launched,
                    registered=registered,
                    speed=speed,
                    priority=DEFAULT_PRIORITY if priority is None else priority,
                    headers=headers or (),
                    options=options,
                    engine=engine,
                    weight_version=self.weight_version
                    if weight_version is None
                    else weight_version,
                )
            else:
                state = old.evolve(
                    status=old.status if old.status in _KEPT_BY_READDING else NodeStatus.STARTING,
                    models=models or old.models,
                    role=role,
                    api_key=api_key if api_key is not None else old.api_key,
                    failures=0,
                    launched=old.launched or launched,
                    registered=old.registered or registered,
                    speed=speed if speed is not None else old.speed,
                    priority=old.priority if priority is None else priority,
                    headers=old.headers if headers is None else headers,
                    options=old.options if options is None else options,
                    engine=old.engine if engine is None else engine,
                    engine_version=old.engine_version if engine is None else None,
                    weight_version=old.weight_version if weight_version is None else weight_version,
                )
            self._put(url, state)
            self._active.setdefault(url, time.monotonic())
            self._models_changed()
        if old is None:
            _log_added(state, origin)
        else:
            _log_change(old, state, f"added again ({origin})" if origin else "added again")
            if _opens(old, state):
                self.doorbell.ring()
        return state

    def _changed(self, changes: list[tuple[NodeState, NodeState]]) -> None:
        """Log each node's change of status, and ring the doorbell when one of them
        opened the node to requests it did not take before (out of the lock)."""
        _log_changes(changes)
        if any(_opens(old, new) for old, new in changes):
            self.doorbell.ring()

    def remove(self, url: str) -> NodeState:
        key = self._key(url)
        with self._lock:
            state = self._nodes.pop(key, None)
            for kept in (self._answers, self._active, self._recent, self._tokens):
                kept.pop(key, None)  # a node removed leaves nothing behind
            self._models_changed()
        if state is None:
            raise UnknownNodeError(f"no node {url!r} in this fleet")
        _log_removed(state)
        return state.evolve(status=NodeStatus.STOPPED)

    def get(self, url: str) -> NodeState:
        state = self._nodes.get(self._key(url))
        if state is None:
            raise UnknownNodeError(f"no node {url!r} in this fleet")
        return state

    def snapshot(self) -> list[NodeState]:
        with self._lock:
            readmitted = self._readmit_due(time.monotonic())
            nodes = list(self._nodes.values())
        self._changed(readmitted)
        return nodes

    def models(self) -> list[str]:
        """Every model any known node serves, sorted."""
        return self._models

    def accepted(self) -> list[str]:
        """Every name a request may give: the served models and the aliases, sorted."""
        return self._accepted

    def engines(self) -> set[str]:
        """The engines the fleet's nodes are known to run (a token-route body that
        either engine takes goes to the one the fleet has)."""
        return {s.engine for s in list(self._nodes.values()) if s.engine is not None}

    def serves(self, state: NodeState, model: str | None) -> bool:
        """Whether `state` serves `model`, under that name or one it stands for."""
        group = self.names.groups.get(model) if model is not None else None
        return state.serves(model) if group is None else not group.isdisjoint(state.models)

    def own_name(self, state: NodeState, model: str) -> str:
        """The name `state` serves `model` under: `model` itself when it has that name,
        else the first of the names it stands for that the node has."""
        if model in state.models:
            return model
        group = self.names.groups.get(model, frozenset())
        return next((m for m in state.models if m in group), model)

    # -- routing ------------------------------------------------------------------

    def lease(
        self,
        strategy: Strategy,
        request: RequestInfo,
        avoid: Collection[str] = (),
        *,
        ticket: int | None = None,
        since: float | None = None,
    ) -> NodeState | None:
        """Pick an eligible node and count one more request in flight on it.

        Nodes in `avoid` (already tried by failover) are used only when nothing
        else is eligible. None means no node is eligible at all, or not for this
        request yet (lmfleet/priority.py): a waiting request of a higher effective
        priority for the same model goes first, and a background one (negative
        effective priority) is not sent to a full node. `ticket`: the request's
        place in the admission queue, waiting since `since`.
        """
        readmitted: list[tuple[NodeState, NodeState]] = []
        with self._lock:
            now = time.monotonic()
            if self._next_readmit <= now:
                readmitted = self._readmit_due(now)
            waited = now if since is None else since
            if self._waiters and self._behind(request, ticket, rank(request.priority, waited)):
                return None
            eligible, panic = self._eligible(request)
            if request.priority < 0 and eligible and effective(request.priority, waited, now) < 0:
                room = [s for s in eligible if not _full(s, now)]
                self.held_back += not room
                eligible = room
            self.panics += panic
            if avoid and eligible:
                fresh = [s for s in eligible if s.url not in avoid]
                eligible = fresh or eligible
            if self._tiered and eligible:
                tiers = self._tiers(eligible, request, now)
                eligible = tiers.nodes
                if tiers.spilled:
                    self.spills[tiers.spilled] += 1
                    self.wake_asked = self.wake_asked or tiers.better_asleep
            chosen = strategy.pick(eligible, request) if eligible else None
            if chosen is not None:
                chosen = chosen.evolve(inflight=chosen.inflight + 1)
                self._put(chosen.url, chosen)
                self._active[chosen.url] = time.monotonic()
        if readmitted:  # rare: this is every request's path
            self._changed(readmitted)
        return chosen

    def explain(self, strategy: Strategy, request: RequestInfo) -> Decision:
        """What `lease` would pick for `request` now, each candidate scored; leases nothing."""
        with self._lock:
            eligible, panic = self._eligible(request)
            note = "panic mode: every eligible node is ejected" if panic else ""
            if not eligible:
                note = "no node is eligible (healthy and serving the model)"
            elif self._tiered:
                tiers = self._tiers(eligible, request, time.monotonic())
                eligible = tiers.nodes
                note = "; ".join(part for part in (note, tiers.note) if part)
            return explain_pick(strategy, eligible, request, note)

    def candidates(self, strategy: Strategy, request: RequestInfo) -> list[Candidate]:
        """The nodes `request` may go to now, as `strategy` scores them, without a pick
        (a rotation's cursor stays) or a tier draw: what a trace records of a lease."""
        with self._lock:
            eligible, _ = self._eligible(request)
            return as_base_strategy(strategy).explain(eligible, request) if eligible else []

    def _tiers(self, eligible: list[NodeState], request: RequestInfo, now: float) -> TierChoice:
        """The tier `request` goes to among `eligible` at `now` (lmfleet/routing/tiers.py);
        under the lock. A tier's size counts its nodes that serve the request, whatever their
        state, but stopped and draining ones (taken out on purpose)."""
        return choose_tier(
            eligible,
            self._serving(request, None),
            draw=self._draws.random(),
            now=now,
            spill_margin=self.spill_margin,
        )

    def _eligible(self, request: RequestInfo) -> tuple[list[NodeState], bool]:
        """(the nodes `request` may go to, whether only ejected ones were left); under the lock."""
        eligible = self._serving(request, NodeStatus.HEALTHY)
        if eligible or self._next_readmit == math.inf:
            return eligible, False
        # Panic mode: every node that could serve this is ejected. Route to them
        # anyway; refusing everything would be worse than their errors.
        ejected = self._serving(request, NodeStatus.EJECTED)
        return ejected, bool(ejected)

    def sleepers(self, request: RequestInfo) -> list[NodeState]:
        """Sleeping nodes that could take `request` once awake (its model, role and
        weight version, as `lease` would judge them), not held by an admin command
        nor quarantined by a weight update: the ones wake-on-demand may wake, the
        best tier's first."""
        with self._lock:
            asleep = self._serving(request, NodeStatus.SLEEPING)
            free = [s for s in asleep if s.url not in self._held and not s.quarantine]
            return sorted(free, key=lambda s: -s.priority)  # the best tier's first

    def _serving(self, request: RequestInfo, status: NodeStatus | None) -> list[NodeState]:
        """Nodes in `status` (None: any) that serve the request's model, in its role if
        it has one, with the weight version it may have (its own ask, and the fleet's
        floor).

        The list is kept for the next request of the same shape (`_put` keeps it up
        to date): callers read it and build their own lists from it."""
        if request.max_staleness is not None:  # relative to the newest version: not kept
            return self._matching(request, self._nodes.values(), status)
        key = (
            status,
            request.model,
            request.role,
            request.engine,
            request.weight_version,
            request.min_weight_version,
            self.version_floor,
        )
        kept = self._serving_cache.get(key)
        if kept is None:
            if len(self._serving_cache) >= SERVING_SHAPES:
                self._serving_cache.clear()  # e.g. one exact weight version per RL step
            nodes = self._matching(request, self._nodes.values(), status)
            kept = self._serving_cache[key] = (nodes, {s.url: i for i, s in enumerate(nodes)})
        return kept[0]

    def _put(self, url: str, state: NodeState) -> None:
        """Store a node's new snapshot; under the lock. `_serving`'s kept answers get
        it in place, or are dropped when it changed what decides eligibility."""
        old = self._nodes.get(url)
        self._nodes[url] = state
        if not self._serving_cache:
            return
        if old is None or _shape(old) != _shape(state):
            self._serving_cache.clear()
            return
        for nodes, positions in self._serving_cache.values():
            at = positions.get(url)
            if at is not None:
                nodes[at] = state

    def _matching(
        self,
        request: RequestInfo,
        among: Iterable[NodeState],
        status: NodeStatus | None = None,
    ) -> list[NodeState]:
        """The nodes of `among` (in `status`, if given) that serve the request's model,
        in its role if it has one, with the weight version it may have (its own ask,
        and the fleet's floor)."""
        model, role = request.model, request.role
        group = self.names.groups.get(model) if model is not None else None
        if group is not None:  # `serves`, with the alias's group looked up once per lease
            among = [s for s in among if not group.isdisjoint(s.models)]
            model = None
        # One pass, `NodeState.serves` written out: over every node, under the lock,
        # whenever `_serving` has no kept answer (71 -> 41 µs over 512 nodes).
        nodes = [
            s
            for s in among
            if (status is None or s.status is status)
            and (model is None or model in s.models)
            and (role is None or s.role is role)
        ]
        if request.engine is not None:
            nodes = [s for s in nodes if s.engine in (request.engine, None)]
        exact, floor = request.weight_version, request.min_weight_version
        if exact is not None:
            return [s for s in nodes if s.weight_version == exact]
        if request.max_staleness is not None:
            fresh = self._newest() - request.max_staleness
            floor = fresh if floor is None else max(floor, fresh)
        if self.version_floor is not None:
            floor = self.version_floor if floor is None else max(floor, self.version_floor)
        if floor is not None:
            return [s for s in nodes if s.weight_version >= floor]
        return nodes

    def _newest(self) -> int:
        """The newest weight version a node of the fleet is at (stopped nodes aside);
        under the lock. A staleness counts from it."""
        versions = [
            s.weight_version for s in self._nodes.values() if s.status is not NodeStatus.STOPPED
        ]
        return max(versions, default=self.weight_version)

    def release(
        self,
        url: str,
        outcome: Outcome,
        *,
        latency: float | None = None,
        ttft: float | None = None,
        tokens: int = 0,
    ) -> None:
        """End one request's accounting: in-flight down, counters, EWMAs and ejection.

        Only successes give latency and TTFT samples. `tokens` is the request's
        generated-token estimate (streamed chunks), if any.
        """
        with self._lock:
            found = self._nodes.get(url)
            if found is None:
                return
            state = before = found
            self._active[url] = time.monotonic()
            success = outcome is Outcome.SUCCESS
            if success and latency is not None:
                recent = self._recent.get(url)
                if recent is None:
                    recent = self._recent[url] = deque(maxlen=LATENCY_WINDOW)
                recent.append(latency)
            if tokens:
                self._tokens[url] = self._tokens.get(url, 0) + tokens
            measured = success and latency is not None
            state = state.evolve(
                inflight=max(0, state.inflight - 1),
                served=state.served + success,
                errors=state.errors + (outcome is Outcome.FAILURE),
                latency=_ewma(state.latency, latency)
                if measured and latency is not None
                else state.latency,
                ttft=_ewma(state.ttft, ttft) if success and ttft is not None else state.ttft,
            )
            if outcome is not Outcome.NEUTRAL:
                window = self._answers.get(url)
                if window is None:
                    window = self._answers[url] = _Window(self._outliers.window)
                window.add(not success)
                state, reason = outliers.judge(
                    state, outcome, window.failed, len(window.answers), self._outliers
                )
                if reason is not None and outliers.may_eject(self._nodes.values(), self._outliers):
                    state = outliers.eject(state, reason, time.monotonic(), self._outliers)
                    window.clear()
                    self._next_readmit = min(self._next_readmit, state.ejected_until)
            self._put(url, state)
        if state.status is not before.status:
            _log_change(before, state)

    def add_tokens(self, url: str, count: int) -> None:
        """Count `count` generated tokens on `url` (from a response's `usage`)."""
        key = self._key(url)
        with self._lock:
            self._tokens[key] = self._tokens.get(key, 0) + count

    def traffic(self, url: str) -> tuple[list[float], int]:
        """(recent latencies, oldest first; generated tokens so far) for one node."""
        key = self._key(url)
        with self._lock:
            return list(self._recent.get(key, ())), self._tokens.get(key, 0)

    def track(self, request_id: str, url: str, session_id: int | str) -> None:
        """`request_id` runs on `url` as the engine's request `session_id` (LMDeploy's
        session, SGLang's rid, vLLM's request id): abortable by the fleet's id."""
        self._sessions[request_id] = (url, session_id)

    def untrack(self, request_id: str) -> None:
        self._sessions.pop(request_id, None)

    def followed(self, url: str) -> int:
        """How many generations the fleet follows on `url` now (each one it can
        continue elsewhere, and abort by its id)."""
        return sum(1 for node, _ in list(self._sessions.values()) if node == url)

    def tracked(self, request_id: str) -> tuple[str, int | str] | None:
        """(node URL, engine session) of a request the fleet can abort by its id."""
        return self._sessions.get(request_id)

    def session_node(self, session_id: int) -> str | None:
        """The node running the tracked request of engine session `session_id`."""
        for url, session in list(self._sessions.values()):
            if session == session_id:
                return url
        return None

    def mark_failed(self, url: str, message: str) -> None:
        """Passive check: a real request failed to reach the node; open the circuit now."""

        def fail(state: NodeState) -> NodeState:
            if state.status is NodeStatus.HEALTHY:
                return state.evolve(status=NodeStatus.UNHEALTHY, message=message)
            return state

        self.modify(url, fail)

    # -- state changes --------------------------------------------------------------

    def recognised(self, url: str, engine: str, version: str | None = None) -> NodeState | None:
        """Record the node's engine (lmfleet/node/profile.py) and, when known, its
        version: the monitor once the node first answers, a command to a node not
        recognised yet before it is sent. Its snapshot after (None: gone)."""

        def apply(current: NodeState) -> NodeState:
            known = version if version is not None else current.engine_version
            if (current.engine, current.engine_version) == (engine, known):
                return current
            if current.engine is None:
                log.debug("%s is %s%s", url, engine, f" {known}" if known else "")
            return current.evolve(engine=engine, engine_version=known)

        return self.modify(url, apply)

    def modify(self, url: str, change: Callable[[NodeState], NodeState]) -> NodeState | None:
        """Apply `change` atomically; None when the node is gone."""
        key = self._key(url)
        with self._lock:
            state = self._nodes.get(key)
            if state is None:
                return None
            new = change(state)
            self._put(key, new)
            if new.models != state.models or new.priority != state.priority:
                self._models_changed()
            if new.status is NodeStatus.HEALTHY and state.status is not NodeStatus.HEALTHY:
                self._active[key] = time.monotonic()  # just started or woken: not idle yet
        self._changed([(state, new)])
        return new

    def hold(self, url: str) -> None:
        """Freeze a node's status against the monitor while an admin command runs."""
        with self._lock:
            self._held.add(self._key(url))

    def unhold(self, url: str) -> None:
        with self._lock:
            self._held.discard(self._key(url))

    def is_held(self, url: str) -> bool:
        return self._key(url) in self._held

    def last_active(self, url: str) -> float | None:
        """The `time.monotonic()` of the node's last lease or release, or of when it last
        became healthy (whichever is latest); None for a node not in the fleet."""
        return self._active.get(self._key(url))

    def saw_activity(self, url: str, at: float) -> None:
        """Another process served the node at `at` (`time.monotonic()` here): auto-sleep
        must count it (the workers of one proxy, lmfleet/proxy/shared.py)."""
        key = self._key(url)
        with self._lock:
            if key in self._active and at > self._active[key]:
                self._active[key] = at

    # -- the admission queue: requests waiting for an eligible node ---------------------

    @property
    def waiting(self) -> int:
        """Requests waiting for an eligible node now, over every client and the proxy."""
        return self._waiting

    def enter_queue(
        self, limit: int, request: RequestInfo | None = None, since: float = 0.0
    ) -> int | None:
        """Count one more request as waiting for a node, from `since`: its ticket, or
        None (not counted) when `limit` already wait. Every ticket must be given back
        by one `leave_queue(ticket)`."""
        with self._lock:
            if self._waiting >= limit:
                return None
            self._waiting += 1
            ticket = next(self._tickets)
            if request is not None:
                self._waiters[ticket] = (rank(request.priority, since), request.model)
            return ticket

    def leave_queue(self, ticket: int | None = None) -> None:
        """A waiting request got its node, gave up or was abandoned."""
        with self._lock:
            self._waiting -= 1
            self._waiters.pop(ticket or 0, None)

    def serving_now(self, request: RequestInfo) -> bool:
        """Whether a healthy node serves `request` (full, or wanted first by a higher
        priority, perhaps: a request that waits for its turn, not for a node)."""
        with self._lock:
            return bool(self._serving(request, NodeStatus.HEALTHY))

    def _behind(self, request: RequestInfo, ticket: int | None, place: float) -> bool:
        """Whether another waiting request for the same model goes before one at
        `place` (its `priority.rank`); under the lock."""
        model = request.model
        return any(
            other < place and their_model == model and their_ticket != ticket
            for their_ticket, (other, their_model) in self._waiters.items()
        )

    # -- what a waiting request may still get --------------------------------------------

    def bring(self, version: int) -> None:
        """A weight update to `version` has begun: requests asking for it may wait."""
        with self._lock:
            self._bringing[version] = self._bringing.get(version, 0) + 1

    def brought(self, version: int) -> None:
        """The update `bring` announced has ended (whatever its result)."""
        with self._lock:
            left = self._bringing.get(version, 0) - 1
            if left > 0:
                self._bringing[version] = left
            else:
                self._bringing.pop(version, None)

    def hopeless(self, request: RequestInfo) -> str | None:
        """Why no node could ever take `request` as the fleet stands, or None.

        Waiting makes sense only for what can change by itself: a node coming up,
        waking, recovering or returning from ejection, or a weight update under way.
        It cannot give a role no node has, a model no node serves, or a weight
        version no node is at and no update is bringing: such a request is refused
        at once rather than held for `wait_for_node`. An empty fleet is never
        hopeless (nodes may still register), nor is a model while some node's
        models are not known yet.
        """
        with self._lock:
            nodes = [s for s in self._nodes.values() if s.status is not NodeStatus.STOPPED]
            bringing = set(self._bringing)
        if not nodes:
            return None
        if request.role is not None:
            nodes = [s for s in nodes if s.role is request.role]
            if not nodes:
                return f"no node has the {request.role.name.lower()} role"
        if request.engine is not None:
            nodes = [s for s in nodes if s.engine in (request.engine, None)]
            if not nodes:
                return f"no node runs {request.engine} (the route asked for is {request.engine}'s)"
        model = request.model
        if model is not None:
            nodes = [s for s in nodes if not s.models or self.serves(s, model)]
            if not nodes:
                return f"no node serves {model!r}"
        have = sorted({s.weight_version for s in nodes})
        shown = ", ".join(map(str, have))
        exact, floor = request.weight_version, request.min_weight_version
        if exact is not None and exact not in have and exact not in bringing:
            return (
                f"no node is at weight version {exact} (they are at {shown}) "
                "and no weight update is bringing it"
            )
        if floor is not None and max([*have, *bringing]) < floor:
            return (
                f"no node is at weight version {floor} or later (they are at {shown}) "
                "and no weight update is bringing one"
            )
        return None

    def _readmit_due(self, now: float) -> list[tuple[NodeState, NodeState]]:
        """Re-admit (on probation) every ejected node whose time is up; under the lock.

        Returns (before, after) of each, for the caller to log once the lock is free."""
        if self._next_readmit > now:
            return []
        readmitted = []
        self._next_readmit = math.inf
        for url, state in self._nodes.items():
            if state.status is not NodeStatus.EJECTED:
                continue
            if state.ejected_until <= now:
                self._put(url, outliers.readmit(state))
                self._active[url] = now
                readmitted.append((state, self._nodes[url]))
            else:
                self._next_readmit = min(self._next_readmit, state.ejected_until)
        return readmitted

    def _key(self, url: str) -> str:
        """The node's identity for any spelling `add` accepts (exact spellings are free)."""
        if url in self._nodes:
            return url
        try:
            return normalize_url(url)
        except ConfigError:
            return url


# -- the operator's log: one line per change of a node's status ----------------------
#
# Every status change goes through this module (`add`, `remove`, `modify`, `release`,
# re-admission), so this is the one place that logs them: exactly one line per
# change, whoever made it (monitor, passive check, ejection, admin command, launcher),
# and none while a node keeps its status (no line per probe). Logged after the lock
# is released: a slow handler must never stall routing.

_WORSE = frozenset({NodeStatus.UNHEALTHY, NodeStatus.EJECTED})
"""Changes an operator must notice: logged at WARNING; every other one at INFO."""


def _shape(state: NodeState) -> tuple[object, ...]:
    """What `NodeRegistry._matching` judges a node by: a change here re-runs it."""
    return (state.status, state.models, state.role, state.engine, state.weight_version)


def _full(state: NodeState, now: float) -> bool:
    """Whether the node holds as many requests as its batch runs (`NodeState.capacity`),
    every client's, and `QUEUE_HEADROOM` more in its queue: one more would wait there
    behind them."""
    capacity = state.capacity
    if capacity is None:
        return False
    return state.held(now) >= capacity + QUEUE_HEADROOM


def _log_added(state: NodeState, origin: str | None) -> None:
    how = origin or (
        "registered itself"
        if state.registered
        else "launched here"
        if state.launched
        else "attached"
    )
    if state.models:
        how += "; models " + ", ".join(state.models)
    log.info(
        "node %s added (%s)",
        state.url,
        how,
        extra={"node": state.url, "previous": None, "state": state.status.value},
    )


def _log_removed(state: NodeState) -> None:
    log.info(
        "node %s removed (was %s)",
        state.url,
        state.status.value,
        extra={"node": state.url, "previous": state.status.value, "state": "removed"},
    )


_KEPT_BY_READDING = frozenset({NodeStatus.HEALTHY, NodeStatus.SLEEPING})
"""Statuses a re-added node keeps (`NodeRegistry.add`)."""


def _log_change(old: NodeState, new: NodeState, detail: str | None = None) -> None:
    """`node URL OLD -> NEW: why`, when the status changed; nothing otherwise."""
    if new.status is old.status:
        return
    reasons = [new.message if detail is None else detail]
    first = old.status is NodeStatus.STARTING or new.models != old.models
    if new.status is NodeStatus.HEALTHY and new.models and first:
        reasons.append("serves " + ", ".join(new.models))  # news: up at last, or new models
    why = "; ".join(r for r in reasons if r)
    log.log(
        logging.WARNING if new.status in _WORSE else logging.INFO,
        "node %s %s -> %s: %s" if why else "node %s %s -> %s%s",
        new.url,
        old.status.value,
        new.status.value,
        why,
        extra={"node": new.url, "previous": old.status.value, "state": new.status.value},
    )


def _opens(old: NodeState, new: NodeState) -> bool:
    """Whether `new` takes requests that `old` did not: it became healthy, or a healthy
    node's weight version or models changed (what a waiting request may ask for)."""
    if new.status is not NodeStatus.HEALTHY:
        return False
    return (
        old.status is not NodeStatus.HEALTHY
        or new.weight_version != old.weight_version
        or new.models != old.models
    )


def _log_changes(changes: list[tuple[NodeState, NodeState]]) -> None:
    for old, new in changes:
        _log_change(old, new)
