"""The weight-update side of `LMFleet`: a mixin, so that fleet.py stays about the
fleet itself. Every method delegates to update.py and rolling.py; the fleet gives
them its runtime and its `WeightUpdater`. `update_weights` is `aupdate_weights` run
in the fleet's loop (lmfleet/sync.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from lmfleet.runtime import FleetRuntime
from lmfleet.sync import blocking, in_fleet_loop
from lmfleet.weights.bodies import Payload, check_payload
from lmfleet.weights.rolling import combine, groups
from lmfleet.weights.session import InFlight, UpdateResult, WeightUpdater
from lmfleet.weights.update import WeightUpdate


class WeightMethods:
    """Mixed into `LMFleet`, which sets `runtime` and `_updater`."""

    runtime: FleetRuntime
    _updater: WeightUpdater

    def weight_update(
        self,
        version: int,
        *,
        nodes: Sequence[str] | str | None = None,
        level: int = 1,
        allow_mixed: bool = False,
        in_flight: InFlight = "continue",
    ) -> WeightUpdate:
        """A weight update to `version` as a context manager (`with` or `async with`).

        On entry the nodes (default: every node up) leave routing, drain (bounded by
        `drain_timeout`), sleep (`level` 1 or 2) and wake their weights; inside, push
        (`update.push(payload)`), or push yourself to `update.nodes`, or use the NCCL
        helpers; on exit each node wakes its KV cache and serves `version`. A node that
        fails is quarantined with its reason. Unless `allow_mixed`, requests go only to
        nodes of `version` from the start. `in_flight`: what happens to the requests
        running on the nodes (`"continue"`, the default: cut each `/generate` and
        finish it on a node of an allowed version after the update, its caller getting
        one answer, and wait for the others; `"drain"`: wait for every one; `"abort"`:
        cut every one). See docs/guide/rl.md.
        """
        self.runtime.check_open()
        return WeightUpdate(
            self.runtime,
            self._updater,
            version,
            nodes,
            level=level,
            allow_mixed=allow_mixed,
            in_flight=in_flight,
        )

    @in_fleet_loop
    async def aupdate_weights(
        self,
        payload: Payload,
        *,
        version: int,
        nodes: Sequence[str] | str | None = None,
        rolling: bool | int = False,
        level: int = 1,
        allow_mixed: bool | None = None,
        in_flight: InFlight = "continue",
    ) -> UpdateResult:
        """Push `payload` to the nodes and make them serve `version`, in one call
        (`update_weights` from sync code, `await fleet.aupdate_weights` from a loop).

        `payload`: one body (an `UpdateParamsRequest` dict or the serialized string),
        a list of bodies (buckets), `{url: bodies}`, or `node -> bodies`. All nodes
        together (an RL sync step), or `rolling=k` nodes at a time while the others
        serve (mixing versions meanwhile, unless `allow_mixed=False`). `in_flight` as
        for `weight_update`. Never retried. A payload given as data (not a function)
        that has no bodies for one of the nodes, or a body that is none, raises
        `ConfigError` before any node is touched.
        """
        results = []
        updates = self._rolling(version, nodes, rolling, level, allow_mixed, in_flight, payload)
        for update in updates:
            async with update:
                await update.apush(payload)
            results.append(_result(update))
        return combine(version, results)

    update_weights = blocking(aupdate_weights)
    """`aupdate_weights` from sync code: the same arguments, result and errors."""

    def _rolling(
        self,
        version: int,
        nodes: Sequence[str] | str | None,
        rolling: bool | int,
        level: int,
        allow_mixed: bool | None,
        in_flight: InFlight,
        payload: Payload,
    ) -> Iterator[WeightUpdate]:
        """One `WeightUpdate` per group, made when the previous group is done (the
        nodes are chosen once, up front, and a payload given as data is checked for
        each of them before any is touched); rolling allows mixing unless told not to."""
        self.runtime.check_open()
        mixed = bool(rolling) if allow_mixed is None else allow_mixed
        urls = self._updater.updatable(nodes)
        chosen = groups(urls, rolling)
        check_payload(payload, self._updater.targets(urls))
        for group in chosen:
            yield self.weight_update(
                version, nodes=group, level=level, allow_mixed=mixed, in_flight=in_flight
            )


def _result(update: WeightUpdate) -> UpdateResult:
    assert update.result is not None  # set by the exit of its `with` block
    return update.result
