"""Active health checks: probe a node, decide its next state, and the polling loop.

The decision (`judge`) is pure; the I/O (`probe_health`, `is_sleeping`,
`fetch_models`) is a few small coroutines; `Monitor` schedules them. LMDeploy's
`/health` is a snapshot that can lag a sleep or a wakeup by up to 12 s, while
`/is_sleeping` is immediate: whenever a probe would move a node between healthy
and sleeping (or back into rotation) the monitor asks `/is_sleeping` first.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass

import anyio
import httpx2
from anyio.abc import TaskStatus

from lmfleet.config import HealthOptions
from lmfleet.probe import ProbeError, Prober
from lmfleet.registry import NodeRegistry
from lmfleet.state import NodeState, NodeStatus

_FINAL = (NodeStatus.DRAINING, NodeStatus.STOPPED)


@dataclass(frozen=True, slots=True)
class Probe:
    """What one `GET /health` said: `status` is LMDeploy's word, or "unreachable"."""

    status: str
    message: str

    @property
    def ok(self) -> bool:
        return self.status in ("healthy", "sleeping")


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def probe_health(prober: Prober, url: str, timeout: float) -> Probe:
    """`GET /health`. A 200 with an empty or non-JSON body means healthy (older servers)."""
    try:
        status, raw = await prober.get(url, "/health", timeout)
    except ProbeError as exc:
        return Probe("unreachable", f"unreachable: {exc}")
    word, message = "", ""
    with contextlib.suppress(ValueError):
        body = json.loads(raw)
        if isinstance(body, dict):
            word = str(body.get("status", "")).lower()
            message = str(body.get("message", ""))
    if status == 200:
        word = word if word in ("sleeping", "unhealthy", "initializing") else "healthy"
    elif word not in ("unhealthy", "initializing"):
        word = "unhealthy"
    return Probe(word, message or f"HTTP {status} {word}")


async def is_sleeping(
    client: httpx2.AsyncClient, url: str, api_key: str | None, timeout: float
) -> bool | None:
    """LMDeploy's immediate sleep flag; None where the server has no such route."""
    try:
        response = await client.get(url + "/is_sleeping", headers=_auth(api_key), timeout=timeout)
        body = response.json()
    except (httpx2.HTTPError, ValueError):
        return None
    if response.status_code != 200 or not isinstance(body, dict):
        return None
    value = body.get("is_sleeping")
    return value if isinstance(value, bool) else None


async def fetch_models(
    client: httpx2.AsyncClient, url: str, api_key: str | None, timeout: float
) -> tuple[str, ...] | str:
    """The served model ids, or an error message."""
    try:
        response = await client.get(url + "/v1/models", headers=_auth(api_key), timeout=timeout)
    except httpx2.HTTPError as exc:
        return f"GET /v1/models failed: {type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return f"GET /v1/models answered HTTP {response.status_code}"
    try:
        data = response.json()["data"]
        return tuple(str(item["id"]) for item in data)
    except (ValueError, KeyError, TypeError):
        return "GET /v1/models returned an unexpected body"


def judge(state: NodeState, probe: Probe, unhealthy_after: int) -> NodeStatus:
    """The status a node should have after `probe`, before any confirmation.

    A node that has never been healthy stays `starting` while it says
    "initializing" or, when this fleet launched it, while it is still coming up;
    an attached node that cannot be reached becomes `unhealthy` (and says why).
    """
    if state.status in _FINAL:
        return state.status
    if probe.status == "healthy":
        return NodeStatus.HEALTHY
    if probe.status == "sleeping":
        return NodeStatus.SLEEPING
    if state.status is NodeStatus.STARTING and (state.launched or probe.status == "initializing"):
        return NodeStatus.STARTING
    if state.failures + 1 >= unhealthy_after or state.status is NodeStatus.UNHEALTHY:
        return NodeStatus.UNHEALTHY
    return state.status


class Monitor:
    """Polls every node's `/health` on its own jittered schedule.

    `/health` goes through the lean `Prober`; the rare confirmations
    (`/is_sleeping`, `/v1/models`) through the fleet's httpx2 client.
    """

    def __init__(
        self,
        registry: NodeRegistry,
        options: HealthOptions,
        client: httpx2.AsyncClient,
        rng: random.Random | None = None,
    ) -> None:
        self._registry = registry
        self._options = options
        self._client = client
        self._prober = Prober()
        self._rng = rng or random.Random()
        self._loops: set[str] = set()
        self._changed = anyio.Event()

    def poke(self) -> None:
        """Re-read the node list now (call from the monitor's event loop)."""
        self._changed.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._schedule(task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await self._prober.aclose()

    async def _schedule(self, task_status: TaskStatus[None]) -> None:
        """One small loop per node, started when the node appears.

        Per-node loops sleep with plain `anyio.sleep`: a single scheduler waiting
        on "next due or poked" needs a cancel-scope timer per wait, and under
        uvloop (whose timers may fire a little early) anyio re-arms such a timer
        in a tight loop; that alone cost more than all the probes.
        """
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                for state in self._registry.snapshot():
                    if state.url not in self._loops:
                        self._loops.add(state.url)
                        tg.start_soon(self._node_loop, state.url)
                self._changed = anyio.Event()
                await self._changed.wait()

    async def _node_loop(self, url: str) -> None:
        try:
            while await self.check(url) is not None:
                await anyio.sleep(self._interval())
        finally:
            self._loops.discard(url)

    def _interval(self) -> float:
        options = self._options
        return options.interval * (1.0 + options.jitter * self._rng.random())

    async def check(self, url: str) -> NodeState | None:
        """Probe one node now and apply what it says; None when the node is gone."""
        registry, options = self._registry, self._options
        try:
            state = registry.get(url)
        except LookupError:
            return None
        probe = await probe_health(self._prober, url, options.timeout)
        target = judge(state, probe, options.unhealthy_after)
        message = probe.message
        models: tuple[str, ...] | None = None
        if target in (NodeStatus.HEALTHY, NodeStatus.SLEEPING) and target is not state.status:
            asleep = await is_sleeping(self._client, url, state.api_key, options.timeout)
            if asleep is not None:
                target = NodeStatus.SLEEPING if asleep else NodeStatus.HEALTHY
        if target is NodeStatus.HEALTHY and (state.status is not target or not state.models):
            found = await fetch_models(self._client, url, state.api_key, options.timeout)
            if isinstance(found, str):
                target, message = NodeStatus.UNHEALTHY, found
            else:
                models = found

        unchanged = (target, message, models, probe.ok) == (state.status, state.message, None, True)
        if unchanged and state.failures == 0:
            return state  # the common case, a healthy node still healthy: nothing to write

        def apply(current: NodeState) -> NodeState:
            failures = 0 if probe.ok else current.failures + 1
            if current.status in _FINAL or registry.is_held(url):
                return current.evolve(failures=failures)
            return current.evolve(
                status=target,
                failures=failures,
                message=message,
                models=models if models is not None else current.models,
            )

        return registry.modify(url, apply)
