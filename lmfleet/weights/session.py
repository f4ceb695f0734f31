"""One weight update over some nodes: the phases, run in the fleet's event loop.

    begin:  preflight every node (nothing is touched if one cannot take weights),
            take the nodes out of routing, drain them (bounded), `POST /sleep?level=`
            (LMDeploy aborts whatever is left) and `POST /wakeup?tags=weights`
    push:   the caller's buckets (`POST /update_weights`), or its own pushes, or the
            NCCL calls (`call_all`); never retried
    end:    `POST /wakeup?tags=kv_cache`, `/is_sleeping` confirmed false, the version
            recorded, the node back in routing

(LMDeploy's routes; a vLLM or SGLang node takes the same phases through its own,
`EngineProfile`: lmfleet/node/profile.py.)

A node that fails any phase is quarantined: asleep, out of routing, left alone by
the monitor and by wake-on-demand, with its reason in its status, until a later
update succeeds on it. It is never put back half-updated. The KV cache sleeps for
the whole update, so no prefix cached under the old weights survives it (LMDeploy's
`/update_weights` does not clear the prefix cache itself).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import anyio

from lmfleet.config import FleetOptions
from lmfleet.errors import (
    ConfigError,
    LMFleetError,
    NodeCommandError,
    WeightUpdateError,
    WeightUpdateUnsupportedError,
)
from lmfleet.node.admin import one_or_many, wait_idle
from lmfleet.node.client import NodeClient
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.registry import NodeRegistry
from lmfleet.weights.calls import post_json
from lmfleet.weights.preflight import check_argv, check_backend, preflight_error, tp_size

log = logging.getLogger("lmfleet")

ArgvOf = Callable[[str], Sequence[str] | None]
"""A launched node's command line by URL (None: attached, not launched here)."""

UPDATABLE = (NodeStatus.HEALTHY, NodeStatus.SLEEPING, NodeStatus.EJECTED)
"""Nodes a fleet-wide update includes: up, whether serving or asleep."""


InFlight = Literal["drain", "abort", "continue"]
"""What a weight update does with the requests running on its nodes: `continue` (the
default) cuts each generation the fleet follows (LMDeploy `/generate`:
transport/continuation.py) at once and finishes it on a node of an allowed version
after the update, its caller getting one answer, and waits for the others (chat,
completions: up to `drain_timeout`); `drain` waits for every one; `abort` cuts every
one at once (their callers get the partial answer, `finish_reason` abort). Measured
in bench/rl_step.py (docs/benchmarks.md §7)."""
IN_FLIGHT: tuple[InFlight, ...] = ("drain", "abort", "continue")


@dataclass(frozen=True, slots=True)
class UpdateTarget:
    """One node of an update, for a caller that pushes weights by itself."""

    url: str
    api_key: str | None = field(repr=False)
    tp: int = 1
    """Tensor-parallel size (a launched node's `--tp`; 1 when not known)."""
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """The node's own extra headers (`NodeOptions`), sent with its key."""
    engine: str | None = None
    """Its engine ("lmdeploy", "vllm", "sglang"; None: not recognised, LMDeploy's
    routes): a payload function makes each engine's bodies (docs/guide/engines.md)."""


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """How a weight update ended: the nodes now serving `version`, and those left out."""

    version: int
    updated: tuple[str, ...]
    failed: Mapping[str, str]
    """Quarantined nodes and why."""
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failed


class _Pushed(Enum):
    NOTHING = "nothing"
    PARTIAL = "partial"
    FINISHED = "finished"


class UpdateSession:
    """The phases of one update; created by `WeightUpdater.open`."""

    def __init__(
        self,
        updater: WeightUpdater,
        version: int,
        nodes: list[NodeState],
        *,
        level: int,
        allow_mixed: bool,
        in_flight: InFlight = "continue",
    ) -> None:
        self._updater = updater
        self.in_flight = in_flight
        self._registry = updater.registry
        self._nodes = updater.nodes
        self._options = updater.options
        self.version = version
        self.level = level
        self.allow_mixed = allow_mixed
        self.targets = tuple(updater.target_of(n) for n in nodes)
        self.failed: dict[str, str] = {}
        self._verified: set[str] = set()
        """Nodes whose own command line shows the flags (launched here)."""
        self._pushed = {n.url: _Pushed.NOTHING for n in nodes}
        self._floor_before = self._registry.version_floor
        self._started = time.monotonic()
        self._open = False
        self._closed = False

    @property
    def timeout(self) -> float:
        """Seconds one weight-update call to a node may take."""
        return self._options.update_timeout

    @property
    def all_urls(self) -> list[str]:
        return [t.url for t in self.targets]

    @property
    def live(self) -> list[UpdateTarget]:
        """The nodes still in the update (not failed)."""
        return [t for t in self.targets if t.url not in self.failed]

    # -- begin ----------------------------------------------------------------------------

    async def begin(self) -> None:
        """Preflight, then take every node out of routing and prepare it for new weights."""
        problems: dict[str, str] = {}  # url -> why it cannot load pushed weights

        async def check(target: UpdateTarget) -> None:
            problem = await self._preflight(target)
            if problem is not None:
                problems[target.url] = problem

        await _each(self.targets, check)
        if problems:
            self._updater.release(self)
            self._closed = True
            raise preflight_error(
                {t.url: problems[t.url] for t in self.targets if t.url in problems}
            )
        self._registry.bring(self.version)
        if not self.allow_mixed:
            floor = self._registry.version_floor
            self._registry.version_floor = (
                self.version if floor is None else max(floor, self.version)
            )
        for target in self.targets:
            self._registry.hold(target.url)
        log.info(
            "weight update to version %d: %d node(s), sleep level %d",
            self.version,
            len(self.targets),
            self.level,
        )
        await _each(self.targets, self._prepare)
        self._open = True
        if not self.live:
            result = await self.end(None)
            raise WeightUpdateError(_all_failed(result))

    async def _preflight(self, target: UpdateTarget) -> str | None:
        """Why `target` cannot load pushed weights, as far as it can be known without
        touching it; None: it can, or there is no evidence (then it is tried)."""
        if target.engine not in (None, "lmdeploy"):
            return None  # its flags are LMDeploy's concern only: the push says
        argv = self._updater.argv_of(target.url)
        if argv is not None:
            problem = check_argv(argv)
            if problem is None:
                self._verified.add(target.url)
            return problem
        node = self._registry.get(target.url)
        return check_backend(await self._nodes.weights_backend(node, self._options.admin_timeout))

    async def _prepare(self, target: UpdateTarget) -> None:
        url, options = target.url, self._options
        if self.in_flight == "abort":  # no wait: the sleep aborts what runs on the node
            self._set(url, NodeStatus.SLEEPING, f"updating weights to v{self.version}: cutting")
        else:
            # "continue": wait only for what cannot be continued (a chat, a completion);
            # each generation the fleet follows (transport/continuation.py) is cut by the
            # sleep and goes on elsewhere: the cut is counted with the sleep mark, in one
            # step under the registry's lock, so that no lease falls in between.
            continued = self.in_flight == "continue"
            message = f"updating weights to v{self.version}: draining"
            self._registry.modify(
                url,
                lambda s: s.evolve(
                    status=NodeStatus.SLEEPING, message=message, cuts=s.cuts + continued
                ),
            )
            if continued and self._registry.barrier is not None:
                await self._registry.barrier()  # other workers read their cuts as cuts
            await wait_idle(self._registry, url, options.drain_timeout, continued=continued)
        try:
            node = self._registry.get(url)
            if self.in_flight != "drain" and not self._nodes.profile_of(node).sleep_aborts:
                # SGLang releases memory only when idle: cut what runs, then wait for it.
                await self._nodes.abort(node, None, options.admin_timeout)
                await wait_idle(self._registry, url, options.drain_timeout)
            # A node asleep already (auto-sleep, an earlier failed update) is not put to
            # sleep twice: its KV cache is gone, which is what the sleep is for.
            asleep = await self._nodes.is_sleeping(node, options.admin_timeout)
            if not asleep:
                await self._nodes.sleep(node, self.level, options.admin_timeout)
            await self._nodes.wakeup(node, ["weights"], options.admin_timeout)
        except (NodeCommandError, LMFleetError) as exc:
            self._fail(url, f"preparing: {exc}")
            return
        self._set(url, NodeStatus.SLEEPING, f"updating weights to v{self.version}: loading")

    # -- push -----------------------------------------------------------------------------

    async def push(self, url: str, body: Mapping[str, Any]) -> None:
        """Load one bucket on `url` through its engine's route (LMDeploy `POST
        /update_weights`; vLLM's start/update/finish; SGLang's
        `/update_weights_from_tensor`: `EngineProfile.push`); a failure quarantines
        the node and is raised (`WeightUpdateUnsupportedError` when the server cannot
        load weights at all). Never retried."""
        self._check_open(url)
        node = self._registry.get(url)
        profile = self._nodes.profile_of(node)
        first = self._pushed[url] is _Pushed.NOTHING
        try:
            for call in profile.push(body, self.version, first=first):
                await post_json(
                    self._nodes,
                    node,
                    call.path,
                    call.json if isinstance(call.json, Mapping) else {},
                    self._options.update_timeout,
                    verified=url in self._verified,
                )
        except (NodeCommandError, WeightUpdateUnsupportedError) as exc:
            self._fail(url, f"loading weights: {exc}")
            raise
        self._pushed[url] = _Pushed.FINISHED if body.get("finished") else _Pushed.PARTIAL

    async def call_all(
        self, path: str, bodies: Mapping[str, Mapping[str, Any]], *, finishes: bool = False
    ) -> dict[str, Any]:
        """POST `bodies[url]` to every node in the update at once (the NCCL calls); a
        node that fails or answers `success: false` is quarantined. The answers by URL.

        `finishes`: the call loads a bucket (`/update_weights_from_distributed`), so
        the node's push state follows the body's `finished`."""
        for url in bodies:
            self._check_open(url)
        answers: dict[str, Any] = {}

        async def one(url: str) -> None:
            node = self._registry.get(url)
            body = bodies[url]
            try:
                answer = await post_json(
                    self._nodes, node, path, body, self._options.update_timeout
                )
            except (NodeCommandError, WeightUpdateUnsupportedError) as exc:
                self._fail(url, f"POST {path}: {exc}")
                return
            if isinstance(answer, dict) and answer.get("success") is False:
                self._fail(url, f"POST {path}: {answer.get('message') or 'success: false'}")
                return
            answers[url] = answer
            if finishes:
                self._pushed[url] = _Pushed.FINISHED if body.get("finished") else _Pushed.PARTIAL

        await _each(list(bodies), one)
        return answers

    async def destroy_group(self, bodies: Mapping[str, Mapping[str, Any]]) -> None:
        """`POST /destroy_weights_update_group` everywhere, best effort: the update has
        failed already, and a group left open would block the next one."""

        async def one(url: str) -> None:
            try:
                node = self._registry.get(url)
                await post_json(
                    self._nodes, node, "/destroy_weights_update_group", bodies[url], self.timeout
                )
            except LMFleetError:
                pass

        await _each(list(bodies), one)

    def abandon(self, url: str, reason: str) -> None:
        """The caller could not make `url`'s weights (its payload failed): quarantine it."""
        if url in self._pushed:
            self._fail(url, reason)

    def _check_open(self, url: str) -> None:
        if not self._open or self._closed:
            raise WeightUpdateError("the weight update is not open: push inside its `with` block")
        if url not in self._pushed:
            raise WeightUpdateError(f"{url} is not part of this weight update")
        if url in self.failed:
            raise WeightUpdateError(f"{url} left this update: {self.failed[url]}")

    # -- end ------------------------------------------------------------------------------

    async def end(self, error: str | None) -> UpdateResult:
        """Bring every node that took its weights back into routing at the new version;
        quarantine the rest. `error`: the caller's block failed (every node is left out)."""
        if self._closed:
            raise WeightUpdateError("this weight update has ended already")
        self._closed = True

        async def finish(target: UpdateTarget) -> None:
            pushed = self._pushed[target.url]
            if error is not None:
                self._fail(target.url, f"the update did not complete: {error}")
            elif pushed is _Pushed.PARTIAL:
                self._fail(target.url, "its last bucket was never sent with finished: true")
            else:
                await self._finish(target.url)

        try:
            await _each(self.live, finish)
        finally:
            self._updater.release(self)
            self._registry.brought(self.version)
        updated = tuple(t.url for t in self.targets if t.url not in self.failed)
        if not updated and not self.allow_mixed:
            self._registry.version_floor = self._floor_before
        result = UpdateResult(
            self.version, updated, dict(self.failed), time.monotonic() - self._started
        )
        log.log(
            logging.WARNING if self.failed else logging.INFO,
            "weight update to version %d: %d updated, %d quarantined in %.1f s",
            self.version,
            len(updated),
            len(self.failed),
            result.seconds,
        )
        return result

    async def _finish(self, url: str) -> None:
        options = self._options
        try:
            node = self._registry.get(url)
            rest = self._nodes.profile_of(node).kept_asleep  # LMDeploy: the KV cache
            await self._nodes.wakeup(node, rest, options.admin_timeout)
            asleep = await self._nodes.is_sleeping(node, options.admin_timeout)
        except (NodeCommandError, LMFleetError) as exc:
            self._fail(url, f"waking the KV cache: {exc}")
            return
        if asleep:
            self._fail(url, f"still asleep after waking {', '.join(rest)}")
            return
        version = self.version

        def back(state: NodeState) -> NodeState:
            return state.evolve(
                status=NodeStatus.HEALTHY,
                message=f"weights v{version}",
                weight_version=version,
                quarantine="",
                failures=0,
            )

        self._registry.modify(url, back)
        self._registry.unhold(url)

    # -- state ----------------------------------------------------------------------------

    def _set(self, url: str, status: NodeStatus, message: str) -> None:
        self._registry.modify(url, lambda s: s.evolve(status=status, message=message))

    def _fail(self, url: str, reason: str) -> None:
        """Quarantine `url`: asleep (or unknown), out of routing, its reason kept."""
        if url in self.failed:
            return
        self.failed[url] = reason
        why = f"quarantined: weight update to v{self.version}: {reason}"
        self._registry.modify(
            url, lambda s: s.evolve(status=NodeStatus.SLEEPING, message=why, quarantine=reason)
        )
        self._registry.unhold(url)


class WeightUpdater:
    """A fleet's weight updates: at most one at a time per node."""

    def __init__(
        self,
        registry: NodeRegistry,
        nodes: NodeClient,
        options: FleetOptions,
        argv_of: ArgvOf,
    ) -> None:
        self.registry = registry
        self.nodes = nodes
        self.options = options
        self.argv_of = argv_of
        self._busy: set[str] = set()

    def open(
        self,
        version: int,
        nodes: Sequence[str] | str | None,
        *,
        level: int = 1,
        allow_mixed: bool = False,
        in_flight: InFlight = "continue",
    ) -> UpdateSession:
        """A new update of `nodes` (default: every node up) to `version`; `begin()` it."""
        if isinstance(version, bool) or not isinstance(version, int):
            raise ConfigError(f"a weight version is an integer, got {version!r}")
        if level not in (1, 2):
            raise ConfigError(f"sleep level must be 1 or 2, got {level}")
        floor = self.registry.version_floor
        if floor is not None and version < floor:
            raise ConfigError(
                f"weight version {version} is older than {floor}, the fleet's floor since "
                f"an update that did not allow mixing: a node updated to it would get no "
                f"request. Versions only go forward; give a rollback a new number "
                f"({floor + 1} or more)"
            )
        states = [self.registry.get(url) for url in self.updatable(nodes)]
        if not states:
            raise WeightUpdateError("no node to update (none is healthy or asleep)")
        busy = [s.url for s in states if s.url in self._busy]
        if busy:
            raise WeightUpdateError(f"a weight update is already running on {', '.join(busy)}")
        if in_flight not in IN_FLIGHT:  # before the nodes are held, or they would stay held
            raise ConfigError(f"in_flight must be one of {IN_FLIGHT}, got {in_flight!r}")
        self._busy.update(s.url for s in states)
        return UpdateSession(
            self, version, states, level=level, allow_mixed=allow_mixed, in_flight=in_flight
        )

    def targets(self, urls: Sequence[str]) -> list[UpdateTarget]:
        """The nodes at `urls` as an update would give them to a payload."""
        return [self.target_of(self.registry.get(url)) for url in urls]

    def target_of(self, node: NodeState) -> UpdateTarget:
        argv = self.argv_of(node.url)
        return UpdateTarget(node.url, node.api_key, tp_size(argv), node.headers, node.engine)

    def updatable(self, nodes: Sequence[str] | str | None) -> list[str]:
        """The URLs an update of `nodes` (None: every node up; one URL may be given as
        a string) would take."""
        if nodes is None:
            return [s.url for s in self.registry.snapshot() if s.status in UPDATABLE]
        return [self.registry.get(url).url for url in one_or_many(nodes)]

    def release(self, session: UpdateSession) -> None:
        self._busy.difference_update(t.url for t in session.targets)


async def _each(items: Sequence[Any], work: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    async with anyio.create_task_group() as tg:
        for item in items:
            tg.start_soon(work, item)


def _all_failed(result: UpdateResult) -> str:
    reasons = "; ".join(f"{url}: {why}" for url, why in result.failed.items())
    return f"weight update to v{result.version} failed on every node: {reasons}"
