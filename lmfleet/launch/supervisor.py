"""Watch launched nodes: report exits, restart crashed nodes, follow moved URLs, stop all.

Runs as one task in the fleet's event loop (`run`). Restarts are issued from
that loop thread, which matters for local nodes: their PR_SET_PDEATHSIG is tied
to the thread that forks them. `poll()` may block (a Ray round trip), so polls
run in a worker thread; nothing here holds the registry lock across I/O.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import anyio

from lmfleet.launch.base import LaunchedNode, Launcher, NodeSpec, RestartPolicy
from lmfleet.launch.local import Spawner
from lmfleet.launch.options import LaunchOptions
from lmfleet.launch.process import ManagedProcess
from lmfleet.launch.specs import make_launcher
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.plain_errors import LaunchError, UnknownNodeError
from lmfleet.registry import NodeRegistry


@dataclass
class _Watch:
    node: LaunchedNode
    policy: RestartPolicy
    restarts: int = 0
    exited: int | None = None
    restart_at: float | None = None
    gave_up: bool = False
    was_healthy: bool = False


def _set(
    status: NodeStatus, message: str, exited: int | None = None
) -> Callable[[NodeState], NodeState]:
    """A state change the supervisor makes; `exited` records the process's exit status,
    whose message then stands until the node answers again (see health.Monitor)."""

    def change(state: NodeState) -> NodeState:
        if state.status in (NodeStatus.DRAINING, NodeStatus.STOPPED):
            return state
        return state.evolve(status=status, message=message, failures=0, exited=exited)

    return change


class Supervisor:
    """The launched nodes of one fleet, by URL."""

    def __init__(
        self,
        registry: NodeRegistry,
        *,
        api_key: str | None = None,
        poke: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._poke = poke
        self._api_key = api_key
        self._clock = clock
        self._watches: dict[str, _Watch] = {}
        self._launchers: list[Launcher] = []

    @property
    def nodes(self) -> dict[str, LaunchedNode]:
        return {url: watch.node for url, watch in self._watches.items()}

    def add(self, node: LaunchedNode, policy: RestartPolicy, priority: int | None = None) -> str:
        """Track `node` and register it as a launched (`starting`) node of tier `priority`."""
        state = self._registry.add(
            node.url, api_key=self._api_key, launched=True, priority=priority
        )
        self._watches[state.url] = _Watch(node, policy)
        return state.url

    def log_tail(self, url: str, lines: int = 40) -> str:
        """The tail of launched node `url`'s log."""
        watch = self._watches.get(url)
        if watch is None:
            raise UnknownNodeError(f"{url} was not launched by this fleet: it has no log here")
        return watch.node.log_tail(lines)

    def remove(self, url: str) -> LaunchedNode | None:
        watch = self._watches.pop(url, None)
        return watch.node if watch else None

    def failure(self) -> LaunchError | None:
        """A node that ended before it was ever healthy and will not be restarted."""
        for url, watch in list(self._watches.items()):
            if not watch.gave_up or watch.was_healthy:
                continue
            node = watch.node
            return LaunchError(
                f"node {url} exited with status {watch.exited} before it was ready; "
                f"log {node.log_path}:\n{node.log_tail()}"
            )
        return None

    def launch(
        self,
        specs: list[NodeSpec],
        options: LaunchOptions,
        spawn: Spawner[ManagedProcess],
        priorities: Sequence[int] | None = None,
    ) -> None:
        """Start every node of `specs` at once and watch them; `spawn` forks local ones.

        `priorities`: each node's tier, in `specs` order (default: all 0). The launcher
        is kept until `close()`: Ray's owns the placement group.
        """
        launcher = make_launcher(options, spawn=spawn)
        self._launchers.append(launcher)
        tiers = list(priorities) if priorities is not None else [None] * len(specs)
        for node, priority in zip(launcher.start(specs), tiers, strict=True):
            self.add(node, options.policy, priority)

    def stop_all(self, grace: float = 5.0) -> None:
        """Stop every node at once (each: SIGTERM, SIGKILL after `grace`)."""
        nodes = [watch.node for watch in self._watches.values()]
        if not nodes:
            return
        try:
            pool = ThreadPoolExecutor(max_workers=min(32, len(nodes)))
            first = pool.submit(nodes[0].stop, grace)
        except RuntimeError:  # an exiting interpreter starts no thread (runtime.py)
            for node in nodes:
                node.stop(grace)
            return
        with pool:
            stops = [first, *(pool.submit(node.stop, grace) for node in nodes[1:])]
            for stop in stops:
                stop.result()

    def close(self, grace: float = 5.0) -> None:
        """Stop every node, then release the launchers (Ray placement groups)."""
        try:
            self.stop_all(grace)
        finally:
            for launcher in self._launchers:
                launcher.close()

    async def run(self, interval: float = 0.25) -> None:
        """Forever: poll every node, then act on what changed."""
        while True:
            watches = list(self._watches.items())
            if watches:
                codes = await anyio.to_thread.run_sync(self._poll, watches)
                for (url, watch), code in zip(watches, codes, strict=False):
                    if self._watches.get(url) is watch:
                        self._step(url, watch, code)
            await anyio.sleep(interval)

    @staticmethod
    def _poll(watches: list[tuple[str, _Watch]]) -> list[int | None]:
        return [watch.node.poll() for _, watch in watches]

    def _step(self, url: str, watch: _Watch, code: int | None) -> None:
        node = watch.node
        if node.url != url:
            url = self._moved(url, watch)
        try:
            state = self._registry.get(url)
        except LookupError:
            return
        if state.status is NodeStatus.HEALTHY:
            watch.was_healthy = True
        if code is None:
            if watch.exited is not None and watch.restart_at is None:
                watch.exited = None  # brought back by its backend (a restarted Ray actor)
                watch.gave_up = False
            if getattr(node, "restarting", False) and state.status is not NodeStatus.STARTING:
                self._registry.modify(url, _set(NodeStatus.STARTING, "restarting (Ray actor)"))
            return
        now = self._clock()
        if watch.exited is None:
            self._exited(url, watch, code, now)
        elif watch.restart_at is not None and now >= watch.restart_at:
            watch.restart_at = None
            watch.exited = None
            watch.was_healthy = False
            watch.restarts += 1
            try:
                node.restart()
            except Exception as exc:  # noqa: BLE001 - any launcher failure ends in the node's state
                watch.exited, watch.gave_up = code, True
                failed = _set(NodeStatus.UNHEALTHY, f"restart failed: {exc}", exited=code)
                self._registry.modify(url, failed)
                return
            self._registry.modify(
                url,
                _set(
                    NodeStatus.STARTING, f"restarted ({watch.restarts}/{watch.policy.max_restarts})"
                ),
            )

    def _exited(self, url: str, watch: _Watch, code: int, now: float) -> None:
        watch.exited = code
        policy = watch.policy
        message = f"process exited with status {code}"
        if policy.mode == "on-failure" and watch.was_healthy:
            if watch.restarts < policy.max_restarts:
                delay = policy.delay(watch.restarts)
                watch.restart_at = now + delay
                self._registry.modify(
                    url,
                    _set(
                        NodeStatus.STARTING,
                        f"{message}; restart {watch.restarts + 1}/{policy.max_restarts} "
                        f"in {delay:g} s",
                        exited=code,
                    ),
                )
                return
            message += f"; gave up after {watch.restarts} restart(s)"
        watch.gave_up = True
        self._registry.modify(url, _set(NodeStatus.UNHEALTHY, message, exited=code))

    def _moved(self, old: str, watch: _Watch) -> str:
        """A node came back at another address (a restarted Ray actor): re-key it."""
        self._watches.pop(old, None)
        with contextlib.suppress(LookupError):
            self._registry.remove(old)
        state = self._registry.add(watch.node.url, api_key=self._api_key, launched=True)
        self._watches[state.url] = watch
        self._poke()
        return state.url
