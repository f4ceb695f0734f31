"""The launching side of `LMFleet`: a mixin, so that fleet.py stays about the fleet
itself. `simulate` and `launch` build node specs (`launch/specs.py`) and start them
through the fleet's `Supervisor`; `processes`, `logs` and `_launch_argv` read what
it started.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from lmfleet.config import FleetOptions, merge_options
from lmfleet.launch.base import LaunchedNode, NodeSpec
from lmfleet.launch.command import CommandTemplate, ServerArgValue
from lmfleet.launch.options import LaunchKeywords, LaunchOptions, split_keywords
from lmfleet.launch.sim import DEFAULT_SIM_MODEL
from lmfleet.launch.specs import (
    WEIGHT_UPDATE_SIM_ARGS,
    server_specs,
    sim_specs,
    weight_update_server,
)
from lmfleet.launch.supervisor import Supervisor
from lmfleet.plain_errors import require_serve
from lmfleet.registry import NodeRegistry
from lmfleet.routing import DEFAULT_STRATEGY
from lmfleet.routing.base import Strategy
from lmfleet.routing.tiers import parse_priorities
from lmfleet.runtime import FleetRuntime

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack


class LaunchMethods:
    """Mixed into `LMFleet`, which sets `runtime`, `registry` and `_supervisor`."""

    runtime: FleetRuntime
    registry: NodeRegistry
    _supervisor: Supervisor

    if TYPE_CHECKING:

        def __init__(
            self,
            *,
            strategy: str | Strategy = DEFAULT_STRATEGY,
            api_key: str | None = None,
            options: FleetOptions | None = None,
        ) -> None: ...

        def _poke(self) -> None: ...

        def close(self) -> None: ...

    @classmethod
    def simulate(
        cls,
        nodes: int = 3,
        *,
        model: str = DEFAULT_SIM_MODEL,
        speed: float | Sequence[float] = 1.0,
        sim_args: Sequence[str] = (),
        strategy: str | Strategy = DEFAULT_STRATEGY,
        options: FleetOptions | None = None,
        weight_updates: bool = False,
        priorities: Sequence[int] | None = None,
        engine: str | Sequence[str] = "lmdeploy",
        **keywords: Unpack[LaunchKeywords],
    ) -> Self:
        """Start `nodes` emulated servers (`lmfleet sim`) and route over them.

        The very path `launch` takes, with the simulator's command and no GPUs.
        `speed` scales each node (one value, or one per node: 0.33 is 3x slower);
        `sim_args` are extra `lmfleet sim` flags for every node. `keywords` are the
        fleet shortcuts of `attach` and the `LaunchOptions` of `launch`.
        `weight_updates=True` starts the sims as `launch(weight_updates=True)` starts
        LMDeploy (PyTorch backend, Ray executor), so they take weight updates.
        `priorities`: one tier per node, higher preferred, as in `attach`.
        `engine`: whose HTTP surface each node speaks, "lmdeploy", "vllm" or "sglang"
        (one, or one per node: a mixed fleet; docs/guide/engines.md).
        """
        if weight_updates:
            sim_args = (*WEIGHT_UPDATE_SIM_ARGS, *sim_args)
        require_serve("LMFleet.simulate()")
        shortcuts, launch = split_keywords(keywords, "LMFleet.simulate", launch=True)
        specs = sim_specs(
            nodes,
            model=model,
            speed=speed,
            sim_args=sim_args,
            base_port=launch.base_port,
            engine=engine,
        )
        return cls._launched(specs, launch, strategy, None, options, shortcuts, priorities)

    @classmethod
    def launch(
        cls,
        model: str,
        nodes: int = 1,
        *,
        tp: int = 1,
        backend: str | None = None,
        server_args: Mapping[str, ServerArgValue] | None = None,
        env: Mapping[str, str] | None = None,
        command: CommandTemplate | None = None,
        gpus_per_node: int | None = None,
        strategy: str | Strategy = DEFAULT_STRATEGY,
        api_key: str | None = None,
        options: FleetOptions | None = None,
        weight_updates: bool = False,
        priorities: Sequence[int] | None = None,
        engine: str = "lmdeploy",
        **keywords: Unpack[LaunchKeywords],
    ) -> Self:
        """Start `nodes` servers (each on its own `tp` GPUs) and route over them.

        Returns once every process is started; `wait_ready()` waits for them and raises
        `LaunchError` with a node's log tail if one exits first. `server_args` become
        flags (`{"session_len": 8192}` -> `--session-len 8192`); `command` runs another
        server (a template with `{model}` `{host}` `{port}` `{tp}` `{backend}`, or a
        callable). `keywords`: `attach`'s shortcuts and the `LaunchOptions` fields
        (launcher="ray", restart="on-failure", max_restarts, base_port, log_dir,
        ray_address, placement). `backend` defaults to turbomind; `weight_updates=True`
        starts servers that can take RL weight updates (`--backend pytorch
        --distributed-executor-backend ray`, LMDeploy 0.18's precondition).
        `priorities`: one tier per node, higher preferred, as in `attach`.
        `engine`: "lmdeploy" (`lmdeploy serve api_server`), "vllm" (`vllm serve ...
        --enable-sleep-mode` with `VLLM_SERVER_DEV_MODE=1`) or "sglang" (`python -m
        sglang.launch_server ... --enable-memory-saver --enable-metrics`): each with
        the flags that let the fleet sleep it and read its load
        (docs/guide/engines.md). See docs/launch.md.
        """
        shortcuts, launch = split_keywords(keywords, "LMFleet.launch", launch=True)
        backend, server_args = weight_update_server(backend, server_args, weight_updates, engine)
        specs = server_specs(
            model,
            nodes,
            tp=tp,
            backend=backend,
            server_args=server_args,
            env=env,
            command=command,
            gpus_per_node=gpus_per_node,
            base_port=launch.base_port,
            engine=engine,
        )
        return cls._launched(specs, launch, strategy, api_key, options, shortcuts, priorities)

    @classmethod
    def _launched(
        cls,
        specs: list[NodeSpec],
        launch: LaunchOptions,
        strategy: str | Strategy,
        api_key: str | None,
        options: FleetOptions | None,
        shortcuts: dict[str, Any],
        priorities: Sequence[int] | None = None,
    ) -> Self:
        """A fleet over `specs`, all started at once; `min_ready` defaults to all of them."""
        tiers = parse_priorities(priorities, len(specs)) if priorities is not None else None
        merged = merge_options(options, {"min_ready": len(specs), **shortcuts})
        fleet = cls(strategy=strategy, api_key=api_key, options=merged)
        try:  # forked by the loop thread, which their PR_SET_PDEATHSIG is tied to
            fleet._supervisor.launch(specs, launch, spawn=fleet.runtime.call, priorities=tiers)
            fleet._poke()
        except BaseException:
            fleet.close()
            raise
        return fleet

    @property
    def processes(self) -> Mapping[str, LaunchedNode]:
        """The nodes this fleet launched, by URL: each with its `pid`, `log_tail()`, `stop()`."""
        return MappingProxyType(self._supervisor.nodes)

    def _launch_argv(self, url: str) -> list[str] | None:
        """The command line this fleet started `url` with (None: attached)."""
        node = self._supervisor.nodes.get(url)
        return node.argv if node is not None else None

    def logs(self, url: str, lines: int = 40) -> str:
        """The tail of a launched node's log."""
        return self._supervisor.log_tail(self.registry.get(url).url, lines)
