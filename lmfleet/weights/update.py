"""`WeightUpdate`: the context manager `fleet.weight_update(version)` returns.

One object serves `with` and `async with`: the phases run in the fleet's event
loop (session.py); the sync methods block the caller's thread on them, the `a`-
prefixed twins await them from any event loop. What differs between the twins is
only how the caller's own code runs beside the fleet's calls: each node's payload
is made in the caller's thread or a worker thread, and an NCCL broadcast runs while
the nodes' receiving calls are in flight.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from lmfleet.errors import LMFleetError, WeightUpdateError, WeightUpdateUnsupportedError
from lmfleet.weights.bodies import Payload, node_bodies
from lmfleet.weights.session import UpdateResult, UpdateSession, UpdateTarget, WeightUpdater

if TYPE_CHECKING:
    from lmfleet.runtime import FleetRuntime

T = TypeVar("T")

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
        nodes: Sequence[str] | None,
        *,
        level: int = 1,
        allow_mixed: bool = False,
    ) -> None:
        self._runtime = runtime
        self._updater = updater
        self._version = version
        self._open_args = (version, nodes, level, allow_mixed)
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
        version, nodes, level, allow_mixed = self._open_args
        self._current = self._updater.open(version, nodes, level=level, allow_mixed=allow_mixed)
        return self._current

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

    def __enter__(self) -> WeightUpdate:
        session = self._runtime.call(self._open)
        self._runtime.run(session.begin)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self.result = self._runtime.run(self._session.end, _describe(exc))
        self._check_result(exc)

    async def __aenter__(self) -> WeightUpdate:
        session = await self._acall_sync(self._open)
        await self._acall(session.begin)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self.result = await self._acall(self._session.end, _describe(exc))
        self._check_result(exc)

    def _check_result(self, exc: BaseException | None) -> None:
        result = self.result
        if exc is None and result is not None and not result.updated:
            reasons = "; ".join(f"{url}: {why}" for url, why in result.failed.items())
            raise WeightUpdateError(
                f"weight update to v{result.version} failed on every node: {reasons}"
            )

    # -- push through the fleet -----------------------------------------------------------

    def push(self, payload: Payload) -> None:
        """Send every node its bodies (`POST /update_weights`, buckets in order, the last
        `finished: true`), all nodes at once; a failing node is quarantined and the
        others go on. Raises `WeightUpdateUnsupportedError` when a node cannot load
        weights online, `WeightUpdateError` when none is left, and the payload's own
        exception if it raised."""
        errors: list[BaseException] = []

        def one(target: UpdateTarget) -> None:
            try:
                for body in node_bodies(payload, target):
                    self._runtime.run(self._session.push, target.url, body)
            except BaseException as exc:  # noqa: BLE001 - reported below, node quarantined
                self._runtime.call(self._session.abandon, target.url, _describe(exc))
                errors.append(exc)

        targets = self.nodes
        with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
            list(pool.map(one, targets))
        self._raise_push_errors(errors)

    async def apush(self, payload: Payload) -> None:
        """`push` from an event loop: payloads are made in worker threads."""
        errors: list[BaseException] = []

        async def one(target: UpdateTarget) -> None:
            try:
                bodies = await anyio.to_thread.run_sync(node_bodies, payload, target)
                while (body := await anyio.to_thread.run_sync(next, bodies, None)) is not None:
                    await self._acall(self._session.push, target.url, body)
            except Exception as exc:  # noqa: BLE001 - reported below, node quarantined
                await self._acall_sync(self._session.abandon, target.url, _describe(exc))
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for target in self.nodes:
                tg.start_soon(one, target)
        self._raise_push_errors(errors)

    def _raise_push_errors(self, errors: list[BaseException]) -> None:
        for exc in errors:
            if isinstance(exc, WeightUpdateUnsupportedError):
                raise exc
        for exc in errors:
            if not isinstance(exc, LMFleetError):
                raise exc  # the payload's own failure
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

    def init_group(
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
        bodies, world = self._init_bodies(
            master_address, master_port, group_name, backend, trainer_ranks
        )
        self._beside(
            "/init_weights_update_group",
            bodies,
            lambda: join_fn(world) if join_fn else None,
            group_name,
        )
        return {url: body["rank_offset"] for url, body in bodies.items()}

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
        """`init_group` from an event loop (`join_fn` runs in a worker thread)."""
        bodies, world = self._init_bodies(
            master_address, master_port, group_name, backend, trainer_ranks
        )
        await self._abeside(
            "/init_weights_update_group",
            bodies,
            lambda: join_fn(world) if join_fn else None,
            group_name,
        )
        return {url: body["rank_offset"] for url, body in bodies.items()}

    def update_from_distributed(
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
        for bucket in _buckets(buckets, group_name):
            self._beside(
                "/update_weights_from_distributed",
                {t.url: bucket for t in self.nodes},
                lambda bucket=bucket: broadcast_fn(bucket),  # type: ignore[misc]
                group_name,
                finishes=True,
            )

    async def aupdate_from_distributed(
        self,
        buckets: Iterable[Mapping[str, Any]],
        broadcast_fn: BroadcastFn,
        *,
        group_name: str = DEFAULT_GROUP,
    ) -> None:
        """`update_from_distributed` from an event loop (`broadcast_fn` in a worker thread)."""
        for bucket in _buckets(buckets, group_name):
            await self._abeside(
                "/update_weights_from_distributed",
                {t.url: bucket for t in self.nodes},
                lambda bucket=bucket: broadcast_fn(bucket),  # type: ignore[misc]
                group_name,
                finishes=True,
            )

    def destroy_group(self, group_name: str = DEFAULT_GROUP) -> None:
        """`POST /destroy_weights_update_group` to every node in the update."""
        bodies = _group_bodies([t.url for t in self.nodes], group_name)
        self._runtime.run(self._session.call_all, "/destroy_weights_update_group", bodies)

    async def adestroy_group(self, group_name: str = DEFAULT_GROUP) -> None:
        bodies = _group_bodies([t.url for t in self.nodes], group_name)
        await self._acall(self._session.call_all, "/destroy_weights_update_group", bodies)

    def _beside(
        self,
        path: str,
        bodies: dict[str, Any],
        work: Callable[[], Any],
        group_name: str,
        *,
        finishes: bool = False,
    ) -> None:
        """POST `bodies` in the fleet's loop while `work` (the trainer's side) runs here."""
        session = self._session

        async def call() -> dict[str, Any]:
            return await session.call_all(path, bodies, finishes=finishes)

        future: concurrent.futures.Future[dict[str, Any]] = self._runtime.submit(call)
        try:
            work()
            answers = future.result(timeout=session.timeout + 5.0)
        except BaseException:
            future.cancel()
            self._destroy_quietly(group_name)
            raise
        if (error := self._missing(path, bodies, answers)) is not None:
            self._destroy_quietly(group_name)
            raise error

    async def _abeside(
        self,
        path: str,
        bodies: dict[str, Any],
        work: Callable[[], Any],
        group_name: str,
        *,
        finishes: bool = False,
    ) -> None:
        answers: dict[str, Any] = {}

        async def call() -> None:
            answers.update(
                await self._acall(self._session.call_all, path, bodies, finishes=finishes)
            )

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await anyio.to_thread.run_sync(work)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._destroy_quietly, group_name)
            raise
        if (error := self._missing(path, bodies, answers)) is not None:
            await anyio.to_thread.run_sync(self._destroy_quietly, group_name)
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

    def _destroy_quietly(self, group_name: str) -> None:
        """Tear the group down on every node that had it, ignoring failures: the
        update has already failed, and a dangling group would block the next one."""
        bodies = _group_bodies(self._session.all_urls, group_name)
        self._runtime.run(self._session.destroy_group, bodies)

    # -- reaching the fleet's loop ----------------------------------------------------------

    async def _acall(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Await a session coroutine from any event loop (the fleet's own included)."""
        if self._runtime.in_loop_thread():
            return await func(*args, **kwargs)
        return await anyio.to_thread.run_sync(
            lambda: self._runtime.run(lambda: func(*args, **kwargs))
        )

    async def _acall_sync(self, func: Callable[..., T], *args: Any) -> T:
        if self._runtime.in_loop_thread():
            return func(*args)
        return await anyio.to_thread.run_sync(lambda: self._runtime.call(func, *args))


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


def _describe(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    return f"{type(exc).__name__}: {exc}"
