"""`WeightUpdate`: the context manager `fleet.weight_update(version)` returns.

One object serves `with` and `async with`. Each step is written once, as an async
method whose body runs in the fleet's event loop, where the update's session
(session.py) lives, whichever loop awaits it; its sync twin (`push` for `apush`)
runs it there through lmfleet/sync.py and waits. The twins differ only in where
the caller's own code runs beside the fleet's calls (a trainer's `join_fn`, its
`broadcast_fn`, the buckets' iterable): in a sync call, the calling thread; in an
async call, a worker thread. Payloads are made in worker threads, one per node.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from anyio.lowlevel import checkpoint

from lmfleet.errors import LMFleetError, WeightUpdateError, WeightUpdateUnsupportedError
from lmfleet.sync import blocking, in_fleet_loop, run_beside
from lmfleet.weights.bodies import Payload, node_bodies
from lmfleet.weights.session import (
    InFlight,
    UpdateResult,
    UpdateSession,
    UpdateTarget,
    WeightUpdater,
)

if TYPE_CHECKING:
    from lmfleet.runtime import FleetRuntime

DEFAULT_GROUP = "lmfleet"
"""The NCCL weights-update group name when the caller gives none."""

BroadcastFn = Callable[[Mapping[str, Any]], Any]
"""The trainer's broadcast of one bucket (names, dtypes, shapes) to the group."""


class WeightUpdate:
    """One weight update: out of routing on entry, back at `version` on exit.

        with fleet.weight_update(version=7) as update:
            update.push(lambda node: [serialize(model.state_dict())])

    Inside, push through the fleet (`push`), or by yourself to `update.nodes` (each
    with its URL and key), or with the NCCL helpers (`init_group`,
    `update_from_distributed`, `destroy_group`). A node that fails is quarantined
    with its reason (`failed`), never put back half-updated; the block's exit raises
    `WeightUpdateError` only when no node took the new weights. `result` says how it
    ended.
    """

    def __init__(
        self,
        runtime: FleetRuntime,
        updater: WeightUpdater,
        version: int,
        nodes: Sequence[str] | str | None,
        *,
        level: int = 1,
        allow_mixed: bool = False,
        in_flight: InFlight = "continue",
    ) -> None:
        self._runtime = runtime
        self._updater = updater
        self._version = version
        self._open_args = (version, nodes, level, allow_mixed, in_flight)
        self._current: UpdateSession | None = None
        self.result: UpdateResult | None = None

    @property
    def _session(self) -> UpdateSession:
        if self._current is None:
            raise WeightUpdateError(
                "enter the weight update first: `with fleet.weight_update(...)`"
            )
        return self._current

    def _open(self) -> UpdateSession:
        """The session, created on entry (so an update never entered holds no node)."""
        if self._current is not None:
            raise WeightUpdateError("a WeightUpdate can be entered once; make a new one")
        version, nodes, level, allow_mixed, in_flight = self._open_args
        self._current = self._updater.open(
            version, nodes, level=level, allow_mixed=allow_mixed, in_flight=in_flight
        )
        return self._current

    @property
    def runtime(self) -> FleetRuntime:
        """The fleet's runtime, whose loop runs the update's steps."""
        return self._runtime

    @property
    def version(self) -> int:
        return self._version

    @property
    def nodes(self) -> list[UpdateTarget]:
        """The nodes still in the update, each with `url`, `api_key` and `tp`."""
        return self._current.live if self._current is not None else []

    @property
    def failed(self) -> dict[str, str]:
        """Quarantined nodes and why."""
        return dict(self._current.failed) if self._current is not None else {}

    def __repr__(self) -> str:
        return (
            f"<WeightUpdate v{self.version}: {len(self.nodes)} node(s), {len(self.failed)} failed>"
        )

    # -- enter and exit -------------------------------------------------------------------

    @in_fleet_loop
    async def __aenter__(self) -> WeightUpdate:
        session = self._open()
        with anyio.CancelScope(shield=True):  # half begun, it would hold its nodes
            await session.begin()
        try:
            await checkpoint()
        except BaseException as exc:  # cancelled meanwhile: end it as a failed block
            await self.__aexit__(type(exc), exc, None)
            raise
        return self

    @in_fleet_loop
    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        with anyio.CancelScope(shield=True):  # every node ends updated or quarantined
            self.result = await self._session.end(_describe(exc))
        self._check_result(exc)

    __enter__ = blocking(__aenter__)
    __exit__ = blocking(__aexit__)

    def _check_result(self, exc: BaseException | None) -> None:
        result = self.result
        if exc is None and result is not None and not result.updated:
            reasons = "; ".join(f"{url}: {why}" for url, why in result.failed.items())
            raise WeightUpdateError(
                f"weight update to v{result.version} failed on every node: {reasons}"
            )

    # -- push through the fleet -----------------------------------------------------------

    @in_fleet_loop
    async def apush(self, payload: Payload) -> None:
        """Send every node its bodies (`POST /update_weights`, buckets in order, the last
        `finished: true`), all nodes at once; each node's payload is made in a worker
        thread. A node whose push fails or is cancelled is quarantined and the others
        go on. Raises, once every node is done: a `KeyboardInterrupt` or `SystemExit`
        from the payload, else `WeightUpdateUnsupportedError` when a node cannot load
        weights online, else the payload's own exception, else `WeightUpdateError`
        when no node is left."""
        session = self._session
        errors: list[BaseException] = []

        async def one(target: UpdateTarget) -> None:
            try:
                bodies = await anyio.to_thread.run_sync(node_bodies, payload, target)
                while (body := await anyio.to_thread.run_sync(next, bodies, None)) is not None:
                    await session.push(target.url, body)
            except BaseException as exc:  # the node is quarantined, whatever stopped it
                session.abandon(target.url, _reason(exc))
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    raise
                errors.append(exc)  # raised below: out of a task it would end the loop

        async with anyio.create_task_group() as tg:
            for target in self.nodes:
                tg.start_soon(one, target)
        self._raise_push_errors(errors)

    push = blocking(apush)
    """`apush` from sync code: the same arguments and errors; waits in this thread."""

    def _raise_push_errors(self, errors: list[BaseException]) -> None:
        worst = min(errors, key=_push_error_rank, default=None)
        if worst is not None and _push_error_rank(worst) < 3:
            raise worst
        if errors and not self.nodes:
            raise WeightUpdateError(f"every node failed its push: {self.failed}")

    # -- NCCL -------------------------------------------------------------------------------

    def rank_offsets(self, trainer_ranks: int = 1) -> tuple[dict[str, int], int]:
        """Each node's first rank in the weights-update group, and the group's size.

        The trainer holds ranks 0 .. trainer_ranks-1; each node then takes one rank
        per tensor-parallel worker, in the order of `nodes`."""
        offsets: dict[str, int] = {}
        rank = trainer_ranks
        for target in self.nodes:
            offsets[target.url] = rank
            rank += target.tp
        return offsets, rank

    def _init_bodies(
        self,
        master_address: str,
        master_port: int,
        group_name: str,
        backend: str,
        trainer_ranks: int,
    ) -> tuple[dict[str, dict[str, Any]], int]:
        offsets, world = self.rank_offsets(trainer_ranks)
        bodies = {
            url: {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": offset,
                "world_size": world,
                "group_name": group_name,
                "backend": backend,
            }
            for url, offset in offsets.items()
        }
        return bodies, world

    @in_fleet_loop
    async def ainit_group(
        self,
        master_address: str,
        master_port: int,
        *,
        group_name: str = DEFAULT_GROUP,
        backend: str = "nccl",
        trainer_ranks: int = 1,
        join_fn: Callable[[int], Any] | None = None,
    ) -> dict[str, int]:
        """`POST /init_weights_update_group` to every node at once; meanwhile
        `join_fn(world_size)` joins the trainer's side (its ranks come first). Returns
        each node's rank offset; on any failure the group is destroyed everywhere."""
        self._nccl_capable()
        bodies, world = self._init_bodies(
            master_address, master_port, group_name, backend, trainer_ranks
        )
        join = functools.partial(join_fn, world) if join_fn else _nothing
        await self._beside("/init_weights_update_group", bodies, join, group_name)
        return {url: body["rank_offset"] for url, body in bodies.items()}

    init_group = blocking(ainit_group)
    """`ainit_group` from sync code; `join_fn` runs in this thread."""

    @in_fleet_loop
    async def aupdate_from_distributed(
        self,
        buckets: Iterable[Mapping[str, Any]],
        broadcast_fn: BroadcastFn,
        *,
        group_name: str = DEFAULT_GROUP,
    ) -> None:
        """For each bucket (`names`, `dtypes`, `shapes`, optional `load_format`): post
        `/update_weights_from_distributed` to every node, run `broadcast_fn(bucket)`
        while they wait for it, then collect their replies. The last bucket is sent
        `finished: true`. On any failure the group is destroyed and the error raised."""
        self._nccl_capable()
        left = _buckets(buckets, group_name)
        version = str(self.version)
        while (bucket := await run_beside(next, left, None)) is not None:
            # SGLang ignores `finished` and loads each bucket as it comes: the last
            # one names the version, which it then reports.
            named = {**bucket, "weight_version": version} if bucket.get("finished") else bucket
            await self._beside(
                "/update_weights_from_distributed",
                {t.url: named if t.engine == "sglang" else bucket for t in self.nodes},
                functools.partial(broadcast_fn, bucket),
                group_name,
                finishes=True,
            )

    update_from_distributed = blocking(aupdate_from_distributed)
    """`aupdate_from_distributed` from sync code; `broadcast_fn` runs in this thread."""

    @in_fleet_loop
    async def adestroy_group(self, group_name: str = DEFAULT_GROUP) -> None:
        """`POST /destroy_weights_update_group` to every node in the update."""
        bodies = _group_bodies([t.url for t in self.nodes], group_name)
        await self._session.call_all("/destroy_weights_update_group", bodies)

    destroy_group = blocking(adestroy_group)
    """`adestroy_group` from sync code."""

    def _nccl_capable(self) -> None:
        """`WeightUpdateUnsupportedError` before any call when a node cannot join an
        NCCL weights-update group: LMDeploy and SGLang share these routes; vLLM's
        weight transfer is its own (`push` with its `update_info`)."""
        other = [t.url for t in self.nodes if t.engine not in (None, "lmdeploy", "sglang")]
        if other:
            raise WeightUpdateUnsupportedError(
                f"{', '.join(other)} cannot join an NCCL weights-update group through "
                "/init_weights_update_group (LMDeploy's and SGLang's routes): a vLLM node "
                "takes weights through its weight-transfer engine; push its update_info "
                "bodies instead (docs/guide/engines.md)"
            )

    async def _beside(
        self,
        path: str,
        bodies: dict[str, Any],
        work: Callable[[], Any],
        group_name: str,
        *,
        finishes: bool = False,
    ) -> None:
        """POST `bodies` to the nodes while `work` (the trainer's side) runs beside
        them (`run_beside`: in a sync call's own thread)."""
        session = self._session
        answers: dict[str, Any] = {}

        async def call() -> None:
            answers.update(await session.call_all(path, bodies, finishes=finishes))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await run_beside(work)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._destroy_quietly(group_name)
            raise
        if (error := self._missing(path, bodies, answers)) is not None:
            await self._destroy_quietly(group_name)
            raise error

    def _missing(
        self, path: str, bodies: Mapping[str, Any], answers: Mapping[str, Any]
    ) -> WeightUpdateError | None:
        """The error for the nodes that gave no answer (they failed: the session has
        quarantined them with the reason), or None when every node answered."""
        if len(answers) == len(bodies):
            return None
        failed = {
            url: self._session.failed.get(url, "no answer") for url in bodies if url not in answers
        }
        reasons = "; ".join(f"{url}: {why}" for url, why in failed.items())
        return WeightUpdateError(
            f"POST {path} failed on {len(failed)} node(s), group destroyed: {reasons}"
        )

    async def _destroy_quietly(self, group_name: str) -> None:
        """Tear the group down on every node that had it, ignoring failures: the
        update has already failed, and a dangling group would block the next one."""
        session = self._session
        await session.destroy_group(_group_bodies(session.all_urls, group_name))


def _group_bodies(urls: Sequence[str], group_name: str) -> dict[str, dict[str, Any]]:
    """`/destroy_weights_update_group` bodies for `urls`."""
    return {url: {"group_name": group_name} for url in urls}


def _buckets(buckets: Iterable[Mapping[str, Any]], group_name: str) -> Iterator[dict[str, Any]]:
    """The buckets with the group name, the last one `finished: true`."""
    iterator = iter(buckets)
    try:
        current = dict(next(iterator))
    except StopIteration:
        raise WeightUpdateError("update_from_distributed got no buckets") from None
    for bucket in iterator:
        yield {**current, "group_name": group_name}
        current = dict(bucket)
    yield {**current, "group_name": group_name, "finished": True}


def _nothing() -> None:
    """The trainer's side when the caller gives none."""


def _push_error_rank(exc: BaseException) -> int:
    """Which of a push's errors is raised: the first of the lowest rank (3: none;
    `WeightUpdateError` says no node is left, or nothing is raised)."""
    if not isinstance(exc, Exception):
        return 0  # KeyboardInterrupt, SystemExit from a payload
    if isinstance(exc, WeightUpdateUnsupportedError):
        return 1
    if not isinstance(exc, LMFleetError):
        return 2  # the payload's own failure
    return 3


def _describe(exc: BaseException | None) -> str | None:
    return None if exc is None else _reason(exc)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
