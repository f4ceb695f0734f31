"""Node admin commands: sleep, wakeup, drain. They run in the fleet's event loop.

`POST /sleep` aborts every request in flight on an LMDeploy node, so a node is
first taken out of rotation and drained (bounded), then put to sleep. While a
command runs the node is "held": the monitor cannot put it back into rotation
from a `/health` that lags the truth.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio

from lmfleet.config import FleetOptions
from lmfleet.errors import (
    ConfigError,
    EngineCapabilityError,
    NodeCommandError,
    UnknownRequestError,
)
from lmfleet.node.client import NodeCallError, NodeClient
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.registry import NodeRegistry
from lmfleet.routing.base import RequestInfo
from lmfleet.runtime import FleetRuntime

log = logging.getLogger("lmfleet")


async def wait_idle(
    registry: NodeRegistry, url: str, timeout: float, *, continued: bool = False
) -> bool:
    """Wait until no request is in flight on `url` (with `continued`, none but the
    generations the fleet will continue elsewhere: registry.followed); False if
    `timeout` ran out first."""
    deadline = time.monotonic() + timeout
    while True:
        state = registry.get(url)
        if state.inflight <= (registry.followed(url) if continued else 0):
            return True
        if time.monotonic() >= deadline:
            return False
        await anyio.sleep(0.02)


def _set(status: NodeStatus, message: str) -> Callable[[NodeState], NodeState]:
    def change(state: NodeState) -> NodeState:
        return state.evolve(status=status, message=message)

    return change


async def recognise(nodes: NodeClient, registry: NodeRegistry, url: str, timeout: float) -> None:
    """Learn the engine of a node not recognised yet (still starting when the command
    came) and record it: the command, and the monitor's next rounds, then use its
    own routes (an SGLang node put to sleep must not be read as awake by LMDeploy's)."""
    if registry.get(url).engine is not None:
        return
    try:
        _, profile = await nodes.identify(registry.get(url), timeout)
    except NodeCallError:
        return  # it does not say: the command goes to LMDeploy's routes, and may fail
    registry.recognised(url, profile.name)


async def sleep_node(
    nodes: NodeClient,
    registry: NodeRegistry,
    url: str,
    level: int,
    *,
    drain_timeout: float,
    timeout: float,
) -> None:
    """Take `url` out of rotation, let its requests finish, then put it to sleep
    through its engine's route (LMDeploy `POST /sleep?level=`)."""
    registry.hold(url)
    try:
        await recognise(nodes, registry, url, timeout)
        node = registry.get(url)
        if level == 1 and await nodes.keeps_weights(node, timeout) is False:
            profile = nodes.profile_of(node)
            raise EngineCapabilityError(
                profile.title,
                "sleep at level 1 and keep its weights",
                node=url,
                hint="it drops the weights it releases unless started with "
                "--enable-weights-cpu-backup; level 2 discards them on purpose",
            )
        before = registry.get(url).status
        registry.modify(url, _set(NodeStatus.SLEEPING, "going to sleep: draining"))
        await wait_idle(registry, url, drain_timeout)
        try:
            await nodes.sleep(registry.get(url), level, timeout)
        except NodeCommandError:
            registry.modify(url, _set(before, "sleep failed"))
            raise
        registry.modify(url, _set(NodeStatus.SLEEPING, f"asleep (level {level})"))
    finally:
        registry.unhold(url)


async def wakeup_node(
    nodes: NodeClient,
    registry: NodeRegistry,
    url: str,
    tags: Sequence[str] | None,
    *,
    timeout: float,
) -> None:
    """Wake it through its engine's route (LMDeploy `POST /wakeup[?tags=...]`); the
    node is routable again only when no tag sleeps."""
    registry.hold(url)
    try:
        await recognise(nodes, registry, url, timeout)
        node = registry.get(url)
        await nodes.wakeup(node, tags, timeout)
        asleep = await nodes.is_sleeping(node, timeout)
        if asleep is None:  # no /is_sleeping: trust the wakeup only when it covered every tag
            asleep = not nodes.profile_of(node).fully_awake(tags)
        if asleep:
            registry.modify(
                url, _set(NodeStatus.SLEEPING, f"partly awake ({','.join(tags or ())})")
            )
            return
        try:
            models: tuple[str, ...] | None = await nodes.models(node, timeout)
        except NodeCallError:
            models = None  # the monitor reads them again

        def awake(state: NodeState) -> NodeState:
            found = models if models is not None else state.models
            return state.evolve(
                status=NodeStatus.HEALTHY, message="awake", models=found, failures=0
            )

        registry.modify(url, awake)
    finally:
        registry.unhold(url)


WAKE_RETRY_AFTER = 60.0
"""Seconds a node whose wake-on-demand failed goes after the other sleepers (and is
not counted as able to serve by the proxy's probes)."""


async def drain_node(registry: NodeRegistry, url: str, timeout: float) -> bool:
    """No new requests for `url`; wait for its in-flight ones; then it is `stopped`."""
    registry.modify(url, _set(NodeStatus.DRAINING, "draining"))
    idle = await wait_idle(registry, url, timeout)
    registry.modify(
        url,
        _set(NodeStatus.STOPPED, "drained" if idle else "drain timed out with requests in flight"),
    )
    return idle


class FleetAdmin:
    """Sleep, wake and drain a fleet's nodes, all from the fleet's own event loop.

    The fleet's sync methods reach it through the portal; code already running in
    that loop (the proxy's admin routes, the dashboard's buttons) awaits it.
    """

    def __init__(
        self,
        registry: NodeRegistry,
        options: FleetOptions,
        nodes: NodeClient,
        runtime: FleetRuntime | None = None,
    ) -> None:
        """`runtime`: the fleet's loop, where `starved` starts its wake-ups (None: no
        wake on demand)."""
        self._registry = registry
        self._options = options
        self.nodes = nodes
        self._runtime = runtime
        self._waking: set[str] = set()
        self._wake_failed: dict[str, float] = {}
        """When each node's last wake-on-demand failed (cleared when one succeeds)."""

    def targets(self, nodes: Sequence[str] | str | None) -> list[str]:
        """The URLs of `nodes` (one URL may be given as a string), or of every node
        not stopped."""
        if nodes is None:
            return [s.url for s in self._registry.snapshot() if s.status is not NodeStatus.STOPPED]
        return [self._registry.get(url).url for url in one_or_many(nodes)]

    async def sleep(self, level: int = 1, nodes: Sequence[str] | str | None = None) -> None:
        """Drain, then put nodes to sleep (all, or `nodes`). LMDeploy level 1 or 2."""
        if level not in (1, 2):
            raise ConfigError(f"sleep level must be 1 or 2, got {level}")
        options = self._options

        async def one(url: str) -> None:
            await sleep_node(
                self.nodes,
                self._registry,
                url,
                level,
                drain_timeout=options.drain_timeout,
                timeout=options.admin_timeout,
            )

        await self._each(self.targets(nodes), one)

    async def wakeup(
        self, tags: Sequence[str] | str | None = None, nodes: Sequence[str] | str | None = None
    ) -> None:
        """Wake nodes (all, or `nodes`); `tags` ("weights", "kv_cache") for RL weight updates.

        A tag a node's engine does not know is refused before any node is called: the
        engines ignore it, so the node would stay asleep with no word said."""
        urls = self.targets(nodes)
        tags = one_or_many(tags) if tags is not None else None
        for url in urls:
            profile = self.nodes.profile_of(self._registry.get(url))
            unknown = [t for t in tags or () if profile.wake_tags and t not in profile.wake_tags]
            if unknown:
                raise ConfigError(
                    f"{url} ({profile.title}) has no wake-up tag {', '.join(map(repr, unknown))}; "
                    f"its tags: {', '.join(profile.wake_tags)}"
                )

        async def one(url: str) -> None:
            reason = self._registry.get(url).quarantine
            if reason:
                raise NodeCommandError(
                    f"{url} is quarantined by a failed weight update ({reason}); its "
                    "weights may be half-loaded: a successful weight update brings it back"
                )
            await wakeup_node(
                self.nodes, self._registry, url, tags, timeout=self._options.admin_timeout
            )

        await self._each(urls, one)

    async def abort(
        self, nodes: Sequence[str] | str | None = None, request_id: str | None = None
    ) -> list[str]:
        """Abort one request (`request_id`, from its answer's `x-lmfleet-request-id`)
        or every request in flight on nodes (all, or `nodes`) through the engine's
        abort route; their callers get what was generated so far, ended with
        `finish_reason: "abort"`. The URLs aborted on. `UnknownRequestError` for an id
        the fleet cannot abort (only `/generate` generations it follows run in an
        engine session it chose); `NodeCommandError` names every node that could not
        (LMDeploy 0.18 aborts only when started with `--enable-abort-handling`)."""
        if request_id is not None:
            found = self._registry.tracked(request_id)
            if found is None:
                raise UnknownRequestError(
                    f"no request {request_id!r} that the fleet can abort is running: it "
                    "ended, or it is not a /generate generation (those run in an engine "
                    "session the fleet chose; abort others by node)"
                )
            url, session = found
            await self._abort(url, session)
            return [url]
        urls = self.targets(nodes)

        async def one(url: str) -> None:
            await self._abort(url, None)

        await self._each(urls, one)
        return urls

    async def abort_session(self, session_id: int) -> list[str]:
        """LMDeploy's `/abort_request` for one engine session, through the fleet: on
        the node the fleet knows runs it (a `/generate` it follows, whose caller chose
        its `session_id`), else on every node that has it. `UnknownRequestError` when
        none has."""
        url = self._registry.session_node(session_id)
        if url is not None:
            await self._abort(url, session_id)
            return [url]
        aborted: list[str] = []

        async def one(url: str) -> None:
            try:
                await self._abort(url, session_id)
                aborted.append(url)
            except (NodeCallError, NodeCommandError):
                pass  # not this node's session (LMDeploy: 400), or it cannot abort

        await self._each(self.targets(None), one)
        if not aborted:
            raise UnknownRequestError(f"no node runs session {session_id}")
        return aborted

    async def _abort(self, url: str, session: int | str | None) -> None:
        try:
            await self.nodes.abort(self._registry.get(url), session, self._options.admin_timeout)
        except NodeCallError as exc:
            if exc.status == 501:
                raise NodeCommandError(
                    f"{url} cannot abort: it was started without --enable-abort-handling "
                    "(LMDeploy 0.18 aborts requests only with it)"
                ) from exc
            raise

    async def drain(self, url: str, timeout: float | None = None) -> bool:
        """No new requests for `url`; wait (bounded) for its in-flight ones; then `stopped`."""
        url = self._registry.get(url).url
        limit = self._options.drain_timeout if timeout is None else timeout
        return await drain_node(self._registry, url, limit)

    async def terminate(self, node: NodeState, timeout: float) -> None:
        """Ask a node to exit (LMDeploy's `GET /terminate`); `NodeCommandError` if it won't."""
        await self.nodes.terminate(node, timeout)

    @property
    def waking(self) -> bool:
        """A wake-on-demand is under way (readable from any thread: a set's truth)."""
        return bool(self._waking)

    def starved(self, request: RequestInfo) -> None:
        """No node is eligible for `request` (the router's hook, from any thread): wake
        one sleeper that could take it, if the fleet wakes on demand.

        Auto-sleep implies wake on demand (a fleet that sleeps by itself must wake on
        use). A waiting request calls this again every second or so; while a node is
        being woken those calls cost nothing here.
        """
        runtime, wakes = self._runtime, self._options.wakes_on_demand
        if wakes and runtime is not None and not runtime.closed and not self._waking:
            runtime.start_soon(self.wake_one, request, name="lmfleet wake")

    def wakeable(self, request: RequestInfo) -> list[NodeState]:
        """The sleeping nodes wake-on-demand would wake for `request`, the best first:
        the best tier's (`NodeRegistry.sleepers`), and those whose last wake-up failed
        within `WAKE_RETRY_AFTER` after all the others, the longest ago first (a node
        that cannot wake, tried first every time, would keep every other asleep)."""
        fresh, failed = self._sleepers(request)
        return fresh + failed

    def wakes(self, request: RequestInfo) -> int:
        """How many sleeping nodes a request like `request` would wake, leaving out
        those whose last wake-up failed within `WAKE_RETRY_AFTER` (0 where the fleet
        does not wake on demand): what the proxy's probes count as able to serve."""
        return len(self._sleepers(request)[0]) if self._options.wakes_on_demand else 0

    def _sleepers(self, request: RequestInfo) -> tuple[list[NodeState], list[NodeState]]:
        """The sleepers that could take `request`: those that did not fail to wake
        within `WAKE_RETRY_AFTER`, best first; then those that did, longest ago first."""
        since = time.monotonic() - WAKE_RETRY_AFTER
        failed = {url: at for url, at in self._wake_failed.items() if at > since}
        sleepers = self._registry.sleepers(request)
        fresh = [s for s in sleepers if s.url not in failed]
        late = sorted((s for s in sleepers if s.url in failed), key=lambda s: failed[s.url])
        return fresh, late

    async def wake_one(self, request: RequestInfo) -> None:
        """Wake-on-demand: wake one sleeping node that can take `request`, one at a time
        (`wakeable`'s first)."""
        if self._waking:
            return
        sleepers = self.wakeable(request)
        if not sleepers:
            return
        url = sleepers[0].url
        self._waking.add(url)
        try:
            await wakeup_node(
                self.nodes, self._registry, url, None, timeout=self._options.admin_timeout
            )
        except NodeCommandError as exc:
            # The waiting requests end with NoHealthyNodeError, which lists node states;
            # the next starved call tries another sleeper first.
            self._wake_failed[url] = time.monotonic()
            log.warning("wake on demand: %s did not wake (%s); other sleepers go first", url, exc)
        else:
            self._wake_failed.pop(url, None)
        finally:
            self._waking.discard(url)

    @staticmethod
    async def _each(urls: list[str], command: Callable[[str], Awaitable[None]]) -> None:
        """Run `command` on every node at once; report every failure together (one
        failure as itself, so that its type says what went wrong: an
        `EngineCapabilityError` stays one)."""
        failures: list[NodeCommandError] = []

        async def one(url: str) -> None:
            try:
                await command(url)
            except NodeCommandError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            for url in urls:
                tg.start_soon(one, url)
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise NodeCommandError("; ".join(map(str, failures))) from failures[0]


def one_or_many(items: Sequence[str] | str) -> Sequence[str]:
    """A list of names or URLs where one may be given alone: a string is one item,
    not a sequence of characters."""
    return [items] if isinstance(items, str) else items
