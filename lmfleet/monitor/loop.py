"""The health monitor: probe every node each round, confirm, and record the verdict.

What a probe's answer means is decided in `monitor/judge.py` (pure); the asking is
the node client's (`lmfleet.node.client`): the per-round `/health` (and `/metrics`
beside it) over the lean prober, the rare confirmations over httpx2. LMDeploy's
`/health` is a snapshot that can lag a sleep or a wakeup by up to 12 s, while
`/is_sleeping` is immediate: whenever a probe would move a node between healthy
and sleeping (or back into rotation) the monitor asks `/is_sleeping` first.
"""

from __future__ import annotations

import logging
import random
import time

import anyio
from anyio.abc import TaskGroup, TaskStatus

from lmfleet.config import HealthOptions
from lmfleet.monitor.judge import ANSWERED, FINAL, Probe, judge, status_answer, unreachable
from lmfleet.node.client import NodeCallError, NodeClient
from lmfleet.node.load import next_capacity, parse_metrics
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.registry import NodeRegistry
from lmfleet.wire.prober import Answers, ProbeError, Prober, ProbeRequest

log = logging.getLogger("lmfleet")

NO_METRICS_RETRY = 60.0
"""Seconds before asking again a node that has no `/metrics` (started without it)."""

STANDBY_AFTER = 1.5
"""Intervals after which a standby worker reads a node's `/metrics` itself: worker 0
reads every round (at most 1.1 intervals apart, the jitter), so its reports come
first unless it is down or far behind."""

VIEW_METRICS_INTERVAL = 10.0
"""Seconds between `/metrics` reads when only the status views show them: reading a
node's metrics costs about as much as probing its health."""


def _warn_unreached(state: NodeState, probe: Probe, interval: float) -> None:
    """Say once that a node which announced itself cannot be reached yet.

    An attached node that cannot be reached turns `unhealthy`, which the registry
    logs; one that registered (or was reloaded from a proxy's state file) stays
    `starting`, as LMDeploy registers before its port opens, so without this line
    a wrong URL or a node that never came back would go unmentioned. Launched nodes
    are left out: their process's own exit is what the log reports.
    """
    if not state.registered or state.launched or probe.status != "unreachable":
        return
    log.warning(
        "node %s cannot be reached yet (%s); kept as starting and probed every %g s "
        "(a node registers before its port opens)",
        state.url,
        probe.message,
        interval,
        extra={"node": state.url, "previous": state.status.value, "state": state.status.value},
    )


class Monitor:
    """Polls every node's `/health` on its own jittered schedule.

    `/health` (and `/metrics` beside it) goes through the lean `Prober`, a whole
    round from one task; the rare confirmations (`/is_sleeping`, `/v1/models`)
    through the node client's httpx2, in a task of their own.
    """

    def __init__(
        self,
        registry: NodeRegistry,
        options: HealthOptions,
        nodes: NodeClient,
        rng: random.Random | None = None,
        *,
        routes_on_load: bool = False,
    ) -> None:
        """`routes_on_load`: the fleet's strategy reads node load (`least_load`), so
        `/metrics` is read every round unless `options.metrics_interval` says otherwise."""
        self._registry = registry
        self._options = options
        every = options.metrics_interval
        if every is None:
            every = (
                options.interval if routes_on_load else max(VIEW_METRICS_INTERVAL, options.interval)
            )
        self._metrics_every = every
        self._nodes = nodes
        self._prober = Prober()
        self._rng = rng or random.Random()
        self._running: set[str] = set()
        self._seen: set[str] = set()
        self._next_metrics: dict[str, float] = {}  # url -> when to read /metrics next
        self._next_own: dict[str, float] = {}  # url -> next probe (own interval)
        self._changed = anyio.Event()
        self._tasks: TaskGroup | None = None

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
        """Probe every node once per round; a node that just appeared, at once.

        All nodes of a round are probed together, from one task (`_round`): their
        answers arrive together and the loop wakes a few times per round instead of
        twice per node, which is most of the cost of polling many nodes (each node
        is a different server, so probing them in step burdens none). A node whose
        previous probe is still running (a hung node, up to `timeout`) is skipped
        that round. A node with its own interval (`NodeOptions.health_interval`) is
        probed on its own schedule instead, and nodes with their own timeout in a
        round of their own.
        """
        async with anyio.create_task_group() as tg:
            self._tasks = tg
            task_status.started()
            next_round = 0.0
            while True:
                now = time.monotonic()
                full_round = now >= next_round
                if full_round:
                    next_round = now + self._interval()
                states = self._registry.snapshot()
                urls = [state.url for state in states]
                self._seen.intersection_update(urls)
                for gone in self._next_metrics.keys() - self._seen:
                    del self._next_metrics[gone]
                for gone in self._next_own.keys() - self._seen:
                    del self._next_own[gone]
                rounds: dict[float, list[str]] = {}
                for state in states:
                    url, own = state.url, state.options
                    if url in self._running:
                        continue
                    if own is not None and own.health_interval is not None:
                        if url in self._seen and now < self._next_own.get(url, 0.0):
                            continue
                        self._next_own[url] = now + self._interval(own.health_interval)
                    elif url in self._seen and not full_round:
                        continue
                    rounds.setdefault(self._timeout(state), []).append(url)
                for timeout, due in rounds.items():
                    self._seen.update(due)
                    self._running.update(due)
                    tg.start_soon(self._round, due, timeout)
                self._changed = anyio.Event()
                wake = min([next_round, *self._next_own.values()])
                await self._nap(wake - time.monotonic())

    async def _nap(self, seconds: float) -> None:
        """Sleep `seconds` or until poked, whichever comes first.

        Two tasks and a plain cancel instead of a deadline on a cancel scope: under
        uvloop (whose timers may fire a little early) anyio re-arms a scope's
        deadline timer in a tight loop until the deadline has truly passed.
        """
        async with anyio.create_task_group() as tg:

            async def timer() -> None:
                await anyio.sleep(max(0.0, seconds))
                tg.cancel_scope.cancel()

            async def poked() -> None:
                await self._changed.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(timer)
            tg.start_soon(poked)

    def _interval(self, every: float | None = None) -> float:
        """`every` seconds (the fleet's interval by default), plus the jitter."""
        options = self._options
        every = options.interval if every is None else every
        return every * (1.0 + options.jitter * self._rng.random())

    def _timeout(self, state: NodeState) -> float:
        """Seconds a probe or a confirmation of `state` may take: its own, else the fleet's."""
        own = state.options
        if own is not None and own.health_timeout is not None:
            return own.health_timeout
        return self._options.timeout

    def _paths(self, state: NodeState, metrics: bool) -> tuple[str, ...]:
        """The paths a round asks `state`: its health paths (its own path, else its
        engine's), and its engine's `/metrics` beside them when `metrics`."""
        profile = self._nodes.profile_of(state)
        own = state.options
        health = profile.health if own is None or own.health_path is None else (own.health_path,)
        if metrics and profile.metrics is not None:
            return (*health, profile.metrics.path)
        return health

    async def _round(self, urls: list[str], timeout: float) -> None:
        """Probe `urls` together, each probe up to `timeout` seconds; settle each node
        as its answer arrives.

        A healthy node reads `/metrics` in the same round trip when due."""
        requests = []
        telemetry = self._options.telemetry
        for url in urls:
            try:
                state = self._registry.get(url)
            except LookupError:
                self._running.discard(url)
                continue
            metrics = (
                telemetry
                and state.status is NodeStatus.HEALTHY
                and self._nodes.profile_of(state).metrics is not None
                and self._metrics_due(state)
            )
            if metrics:
                self._metrics_read(url)
            requests.append(self._nodes.probe(state, self._paths(state, metrics)))
        unanswered = {r.url for r in requests}

        def answered(request: ProbeRequest, result: Answers | ProbeError) -> None:
            unanswered.discard(request.url)
            self._answered(request, result)  # releases the node, or its `_confirm` will

        try:
            await self._prober.gather(requests, timeout, answered)
        finally:
            self._running.difference_update(unanswered)

    def _answered(self, request: ProbeRequest, result: Answers | ProbeError) -> None:
        """Settle a node from its answers: here when nothing more must be asked (the
        common case), else in a task of its own (`_confirm`)."""
        url = request.url
        try:
            state = self._registry.get(url)
        except LookupError:
            self._running.discard(url)
            return
        if isinstance(result, ProbeError):
            probe, metrics = unreachable(result), None
        else:
            probe, metrics = self._read(state, request, result)
        target = judge(state, probe, self._options.unhealthy_after)
        if any(self._asks(url, state, target, metrics)):
            assert self._tasks is not None
            self._tasks.start_soon(self._confirm, url, state, probe, target, metrics)
            return
        self._running.discard(url)
        self._settle(url, state, probe, target, None, metrics)

    def _read(
        self, state: NodeState, request: ProbeRequest, answers: Answers
    ) -> tuple[Probe, tuple[int, bytes] | None]:
        """The probe and the `/metrics` answer (None when not asked) of one round's
        answers to `request`: a node's own health path answers 200 for healthy."""
        profile = self._nodes.profile_of(state)
        metrics = profile.metrics
        asked = len(request.paths) - (metrics is not None and request.paths[-1] == metrics.path)
        load = answers[asked] if asked < len(answers) else None
        own = state.options
        if own is not None and own.health_path is not None:
            return status_answer(*answers[0]), load
        return profile.read_health(answers[:asked]), load

    def _asks(
        self, url: str, state: NodeState, target: NodeStatus, metrics: tuple[int, bytes] | None
    ) -> tuple[bool, bool, bool]:
        """What must be asked before `target` stands: (`/is_sleeping`, `/v1/models`, `/metrics`).

        `/is_sleeping` when moving between healthy and sleeping (`/health` lags)
        and the round did not read it already;
        the models when (re)entering rotation or never read, or when the node's
        engine is not recognised yet; the load when due and not read beside
        `/health`."""
        healthy = target is NodeStatus.HEALTHY
        answered = target in (NodeStatus.HEALTHY, NodeStatus.SLEEPING)
        # vLLM's round reads `/is_sleeping` itself: its answer needs no confirmation.
        read = self._nodes.profile_of(state).is_sleeping in self._paths(state, False)
        return (
            answered and target is not state.status and not read,
            (healthy and (state.status is not target or not state.models))
            or (answered and state.engine is None),
            healthy and self._options.telemetry and metrics is None and self._metrics_due(state),
        )

    async def _confirm(
        self,
        url: str,
        state: NodeState,
        probe: Probe,
        target: NodeStatus,
        metrics: tuple[int, bytes] | None,
    ) -> None:
        probed = (state.status, state.message)  # what the probe judged (for `_settle`)
        try:
            timeout = self._timeout(state)
            message, models = probe.message, None
            if self._asks(url, state, target, metrics)[0]:
                asleep = await self._nodes.is_sleeping(state, timeout)
                if asleep is not None and (target is NodeStatus.SLEEPING) is not asleep:
                    # `/health` lags a sleep or a wakeup: the message it gave is stale.
                    target = NodeStatus.SLEEPING if asleep else NodeStatus.HEALTHY
                    message = "asleep (/is_sleeping)" if asleep else "awake (/is_sleeping)"
            _, ask_models, ask_load = self._asks(url, state, target, metrics)
            if ask_models:
                try:
                    models, profile = await self._nodes.identify(state, timeout)
                except NodeCallError as exc:
                    if target is NodeStatus.HEALTHY:  # asleep, its models may wait
                        target, message = NodeStatus.UNHEALTHY, str(exc)
                    ask_load = False
                else:
                    if state.engine is None or state.engine_version is None:
                        version = await self._nodes.version(state, profile, timeout)
                        state = self._registry.recognised(url, profile.name, version) or state
                    if profile.is_sleeping is None and target is NodeStatus.HEALTHY:
                        # Read as LMDeploy's until now; its engine cannot say it sleeps.
                        target = judge(state, Probe("up", message), self._options.unhealthy_after)
            if ask_load:
                await self.read_load(state)
            self._settle(url, state, probe, target, models, metrics, message, probed)
        finally:
            self._running.discard(url)

    def _settle(
        self,
        url: str,
        state: NodeState,
        probe: Probe,
        target: NodeStatus,
        models: tuple[str, ...] | None,
        metrics: tuple[int, bytes] | None,
        message: str | None = None,
        probed: tuple[NodeStatus, str] | None = None,
    ) -> None:
        """Write what the probe decided into the registry (nothing, in the common case).
        `probed`: the node's status and message when the probe began (default
        `state`'s), against which a change made while it ran is seen."""
        registry = self._registry
        message = probe.message if message is None else message
        probed = (state.status, state.message) if probed is None else probed
        if target is NodeStatus.HEALTHY and metrics is not None:
            self._apply_metrics(url, *metrics)

        if not probe.ok and state.failures == 0 and target is NodeStatus.STARTING:
            _warn_unreached(state, probe, self._options.interval)
        unchanged = (target, message, models, probe.ok) == (state.status, state.message, None, True)
        if unchanged and state.failures == 0:
            return  # the common case, a healthy node still healthy: nothing to write

        def apply(current: NodeState) -> NodeState:
            failures = 0 if probe.ok else current.failures + 1
            if current.status in FINAL or registry.is_held(url) or current.quarantine:
                # Drained, held by an admin command, or quarantined by a weight update:
                # only the command (or a later update) decides its status.
                return current.evolve(failures=failures)
            if (current.status, current.message) != probed:
                # Changed while the probe ran: an admin command that ended meanwhile
                # (a sleep: its /is_sleeping read before the engine slept, its models
                # read after the command let go), or another verdict. What the probe
                # read may predate it: the next probe judges the node as it is now.
                return current.evolve(failures=failures)
            if target in ANSWERED and current.status in ANSWERED:
                # Healthy by /health; whether it is ejected is the answers' call, and
                # the registry may have ejected or re-admitted it during the probe.
                return current.evolve(
                    failures=failures,
                    models=models if models is not None else current.models,
                )
            # A launched process that exited explains more than "unreachable" does:
            # its message stands until the node answers again. A node that does not
            # answer has no current load: the last report (perhaps of a process that
            # died under load) must not make a restarted node look busy.
            keep = not probe.ok and current.exited is not None
            return current.evolve(
                status=target,
                failures=failures,
                message=current.message if keep else message,
                exited=current.exited if not probe.ok else None,
                models=models if models is not None else current.models,
                load=current.load if probe.ok else None,
            )

        registry.modify(url, apply)

    def _metrics_due(self, state: NodeState) -> bool:
        """Due by this monitor's schedule; in a worker of `lmfleet serve --workers`
        for a node another worker reads every round and shares
        (`NodeRegistry.reads_metrics`, lmfleet/proxy/shared.py), only once the node's
        latest report is `STANDBY_AFTER` intervals old: one reader per node whatever
        the workers, and while its reader is down (restarting) another reads it."""
        now = time.monotonic()
        if self._next_metrics.get(state.url, 0.0) > now:
            return False
        load = state.load
        if load is None or self._registry.reads_metrics(state.url):
            return True
        return load.read_at + STANDBY_AFTER * self._metrics_every <= now

    def _metrics_read(self, url: str) -> None:
        """Schedule the next `/metrics` read; due again within a round's jitter of the
        interval, so "every round" holds."""
        self._next_metrics[url] = time.monotonic() + 0.9 * self._metrics_every

    async def read_load(self, state: NodeState) -> None:
        """Read the node's own load from its `/metrics` into its snapshot.

        Best effort, through the same lean prober as `/health` (in the same round
        trip when the node was healthy already, `_round`): a failure
        leaves the last report to fade (`NodeLoad.others`); a node without
        `/metrics` (404, or no LMDeploy gauges) is asked again only every minute. Read
        every `metrics_every` seconds: every round for `least_load`, else every 10 s.
        """
        url = state.url
        self._metrics_read(url)
        names = self._nodes.profile_of(state).metrics
        if names is None:
            return
        request = self._nodes.probe(state, (names.path,))
        try:
            ((status, body),) = await self._prober.get_many(request, self._timeout(state))
        except ProbeError:
            return
        self._apply_metrics(url, status, body)

    def _apply_metrics(self, url: str, status: int, body: bytes) -> None:
        load = None
        if status == 200:
            try:
                state = self._registry.get(url)
            except LookupError:
                return  # removed meanwhile
            names = self._nodes.profile_of(state).metrics
            load = (
                parse_metrics(
                    body,
                    read_at=time.monotonic(),
                    local_inflight=state.inflight,
                    peer_inflight=state.peers,
                    fresh_for=self._options.interval,
                    previous=state.load,
                    names=names,
                )
                if names is not None
                else None
            )
        if load is None:
            self._next_metrics[url] = time.monotonic() + NO_METRICS_RETRY
        self._registry.modify(
            url,
            lambda state: state.evolve(load=load, capacity=next_capacity(state.capacity, load)),
        )
