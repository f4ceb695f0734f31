"""NodeRegistry: the only shared mutable state in a fleet.

Every node is one immutable `NodeState`; a change replaces it under one lock. The
transports (in callers' threads and event loops), the monitor (in the fleet's
thread) and the proxy all go through here. Critical sections are a few dict
operations; no I/O ever happens under the lock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Collection
from urllib.parse import urlsplit

from lmfleet.errors import ConfigError, UnknownNodeError
from lmfleet.routing.base import RequestInfo, Strategy
from lmfleet.state import NodeRole, NodeState, NodeStatus

EWMA_ALPHA = 0.2
"""Weight of the newest sample: about the last ten requests shape a node's latency."""

LATENCY_WINDOW = 64
"""Recent latencies kept per node for percentiles (the dashboard's p50)."""


def normalize_url(url: str) -> str:
    """`http://host:port` form used as a node's identity; rejects what is not http(s)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    text = text.rstrip("/").removesuffix("/v1")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"node URL must be http(s)://host[:port], got {url!r}")
    if parts.path or parts.query or parts.fragment:
        raise ConfigError(
            f"node URL must have no path or query (give http://host:port), got {url!r}"
        )
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise ConfigError(f"node URL has an invalid port: {url!r}") from exc
    return text


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + EWMA_ALPHA * (sample - old)


class NodeRegistry:
    """Node snapshots by URL, behind one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeState] = {}
        self._held: set[str] = set()
        self._models: list[str] = []
        # Traffic statistics for dashboards, kept beside the snapshots: O(1) per request.
        self._recent: dict[str, deque[float]] = {}
        self._tokens: dict[str, int] = {}

    def _models_changed(self) -> None:
        # Called under the lock whenever membership or a node's models change, so
        # that the per-request `models()` costs no more than a list copy.
        self._models = sorted({m for s in self._nodes.values() for m in s.models})

    # -- membership ---------------------------------------------------------------

    def add(
        self,
        url: str,
        *,
        api_key: str | None = None,
        models: tuple[str, ...] = (),
        role: NodeRole = NodeRole.HYBRID,
        launched: bool = False,
    ) -> NodeState:
        """Add a node as `starting`, or restart an existing one's checks (counters kept)."""
        url = normalize_url(url)
        with self._lock:
            old = self._nodes.get(url)
            if old is None:
                state = NodeState(
                    url=url, models=models, role=role, api_key=api_key, launched=launched
                )
            else:
                state = old.evolve(
                    status=NodeStatus.STARTING if not old.routable else old.status,
                    models=models or old.models,
                    role=role,
                    api_key=api_key if api_key is not None else old.api_key,
                    failures=0,
                )
            self._nodes[url] = state
            self._models_changed()
            return state

    def remove(self, url: str) -> NodeState:
        with self._lock:
            state = self._nodes.pop(self._key(url), None)
            self._models_changed()
        if state is None:
            raise UnknownNodeError(f"no node {url!r} in this fleet")
        return state.evolve(status=NodeStatus.STOPPED)

    def get(self, url: str) -> NodeState:
        state = self._nodes.get(self._key(url))
        if state is None:
            raise UnknownNodeError(f"no node {url!r} in this fleet")
        return state

    def snapshot(self) -> list[NodeState]:
        with self._lock:
            return list(self._nodes.values())

    def models(self) -> list[str]:
        """Every model any known node serves, sorted."""
        return self._models

    # -- routing ------------------------------------------------------------------

    def lease(
        self, strategy: Strategy, request: RequestInfo, avoid: Collection[str] = ()
    ) -> NodeState | None:
        """Pick an eligible node and count one more request in flight on it.

        Nodes in `avoid` (already tried by failover) are used only when nothing
        else is eligible. None means no node is eligible at all.
        """
        model = request.model
        role = request.role
        with self._lock:
            eligible = [
                s
                for s in self._nodes.values()
                if s.status is NodeStatus.HEALTHY
                and s.serves(model)
                and (role is None or s.role is role)
            ]
            if avoid and eligible:
                fresh = [s for s in eligible if s.url not in avoid]
                eligible = fresh or eligible
            if not eligible:
                return None
            chosen = strategy.pick(eligible, request)
            if chosen is None:
                return None
            leased = chosen.evolve(inflight=chosen.inflight + 1)
            self._nodes[chosen.url] = leased
            return leased

    def release(
        self,
        url: str,
        *,
        ok: bool,
        latency: float | None = None,
        ttft: float | None = None,
        tokens: int = 0,
    ) -> None:
        """End one request's accounting: in-flight down, counters and EWMAs up.

        `tokens` is the request's generated-token estimate (streamed chunks), if any.
        """
        with self._lock:
            state = self._nodes.get(url)
            if state is None:
                return
            if ok and latency is not None:
                recent = self._recent.get(url)
                if recent is None:
                    recent = self._recent[url] = deque(maxlen=LATENCY_WINDOW)
                recent.append(latency)
            if tokens:
                self._tokens[url] = self._tokens.get(url, 0) + tokens
            self._nodes[url] = state.evolve(
                inflight=max(0, state.inflight - 1),
                served=state.served + (1 if ok else 0),
                errors=state.errors + (0 if ok else 1),
                latency=_ewma(state.latency, latency)
                if ok and latency is not None
                else state.latency,
                ttft=_ewma(state.ttft, ttft) if ok and ttft is not None else state.ttft,
            )

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

    def mark_failed(self, url: str, message: str) -> None:
        """Passive check: a real request failed to reach the node; open the circuit now."""

        def fail(state: NodeState) -> NodeState:
            if state.status is NodeStatus.HEALTHY:
                return state.evolve(status=NodeStatus.UNHEALTHY, message=message)
            return state

        self.modify(url, fail)

    # -- state changes --------------------------------------------------------------

    def modify(self, url: str, change: Callable[[NodeState], NodeState]) -> NodeState | None:
        """Apply `change` atomically; None when the node is gone."""
        key = self._key(url)
        with self._lock:
            state = self._nodes.get(key)
            if state is None:
                return None
            new = change(state)
            self._nodes[key] = new
            if new.models != state.models:
                self._models_changed()
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

    @staticmethod
    def _key(url: str) -> str:
        return url.strip().rstrip("/")
