"""From `LMFleet.launch` / `LMFleet.simulate` arguments to node specs and a launcher.

Kept out of fleet.py so that the GPU path and the simulator path share one
builder: the simulator is only another command template with `gpus=0`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lmfleet.launch.base import Launcher, NodeSpec
from lmfleet.launch.command import (
    ENGINE_COMMANDS,
    SIM_COMMAND,
    CommandTemplate,
    ServerArgValue,
)
from lmfleet.launch.local import LocalLauncher, Spawner
from lmfleet.launch.options import LaunchOptions
from lmfleet.launch.process import ManagedProcess
from lmfleet.plain_errors import ConfigError


def _port(base_port: int | None, index: int) -> int | None:
    return None if base_port is None else base_port + index


WEIGHT_UPDATE_SIM_ARGS = ("--backend", "pytorch", "--distributed-executor-backend", "ray")
"""What `simulate(weight_updates=True)` gives each sim: LMDeploy's preconditions."""


def weight_update_server(
    backend: str | None,
    server_args: Mapping[str, ServerArgValue] | None,
    weight_updates: bool,
    engine: str = "lmdeploy",
) -> tuple[str, dict[str, ServerArgValue]]:
    """The backend and server args of `launch(weight_updates=...)`.

    LMDeploy 0.18 loads pushed weights (`/update_weights`) only on the PyTorch engine
    with the Ray executor; `weight_updates=True` asks for both and refuses a
    contradiction rather than start servers that will answer the push with a 500.
    """
    args = dict(server_args or {})
    if engine != "lmdeploy":
        if backend is not None:
            raise ConfigError(f"backend={backend!r} is LMDeploy's; engine={engine!r} has none")
        if weight_updates:
            raise ConfigError(
                f"weight_updates=True picks LMDeploy's backend and executor for its weight "
                f"routes; {engine} takes no such flags: leave it out "
                f"(docs/guide/engines.md says what {engine} needs to take weights)"
            )
        return "turbomind", args
    if not weight_updates:
        return backend or "turbomind", args
    if backend not in (None, "pytorch"):
        raise ConfigError(
            f"weight_updates=True needs backend='pytorch' (LMDeploy loads pushed weights "
            f"only on the PyTorch engine), got backend={backend!r}"
        )
    executor = args.setdefault("distributed_executor_backend", "ray")
    if executor != "ray":
        raise ConfigError(
            "weight_updates=True needs the Ray executor (--distributed-executor-backend ray): "
            f"LMDeploy 0.18's {executor!r} executor cannot load pushed weights"
        )
    return "pytorch", args


def server_specs(
    model: str,
    nodes: int,
    *,
    tp: int = 1,
    backend: str = "turbomind",
    server_args: Mapping[str, ServerArgValue] | None = None,
    env: Mapping[str, str] | None = None,
    command: CommandTemplate | None = None,
    gpus_per_node: int | None = None,
    base_port: int | None = None,
    engine: str = "lmdeploy",
) -> list[NodeSpec]:
    """`nodes` identical servers: the `engine`'s (LMDeploy's api_server, `vllm serve`,
    SGLang's launch_server, each with the flags and environment that let lmfleet
    sleep and read its load) unless `command` says otherwise."""
    if engine not in ENGINE_COMMANDS:
        raise ConfigError(f"engine must be one of {', '.join(ENGINE_COMMANDS)}, not {engine!r}")
    template, needs = ENGINE_COMMANDS[engine]
    if nodes < 1:
        raise ConfigError(f"nodes must be >= 1, got {nodes}")
    if tp < 1:
        raise ConfigError(f"tp must be >= 1, got {tp}")
    gpus = tp if gpus_per_node is None else gpus_per_node
    if gpus < 0:
        raise ConfigError(f"gpus_per_node must be >= 0, got {gpus}")
    return [
        NodeSpec(
            model=model,
            index=i,
            command=template if command is None else command,
            tp=tp,
            backend=backend,
            gpus=gpus,
            server_args=dict(server_args or {}),
            env={**needs, **(env or {})},
            port=_port(base_port, i),
        )
        for i in range(nodes)
    ]


def sim_specs(
    nodes: int,
    *,
    model: str,
    speed: float | Sequence[float] = 1.0,
    sim_args: Sequence[str] = (),
    base_port: int | None = None,
    engine: str | Sequence[str] = "lmdeploy",
) -> list[NodeSpec]:
    """Emulated nodes: the simulator's template, no GPU, one `--speed` and one
    `--engine` (whose HTTP surface it speaks) per node."""
    if nodes < 1:
        raise ConfigError(f"nodes must be >= 1, got {nodes}")
    speeds = [float(speed)] * nodes if isinstance(speed, (int, float)) else list(speed)
    if len(speeds) != nodes:
        raise ConfigError(f"speed has {len(speeds)} values for {nodes} nodes")
    if not all(math.isfinite(s) and s > 0 for s in speeds):
        raise ConfigError(f"speed must be a number > 0 (0.33: 3x slower), got {speed!r}")
    engines = [engine] * nodes if isinstance(engine, str) else list(engine)
    if len(engines) != nodes:
        raise ConfigError(f"engine has {len(engines)} values for {nodes} nodes")
    if unknown := set(engines) - set(SIM_ENGINES):
        raise ConfigError(f"the simulator speaks {', '.join(SIM_ENGINES)}, not {sorted(unknown)}")
    return [
        NodeSpec(
            model=model,
            index=i,
            command=SIM_COMMAND,
            gpus=0,
            extra_args=("--speed", repr(node_speed), "--engine", node_engine, *sim_args),
            port=_port(base_port, i),
        )
        for i, (node_speed, node_engine) in enumerate(zip(speeds, engines, strict=True))
    ]


SIM_ENGINES = ("lmdeploy", "vllm", "sglang")
"""The engines `lmfleet sim --engine` speaks."""


def make_launcher(options: LaunchOptions, *, spawn: Spawner[ManagedProcess]) -> Launcher:
    """The launcher `options` name; Ray restarts dead actors itself under `on-failure`."""
    if options.launcher == "local":
        return LocalLauncher(log_dir=options.log_dir, spawn=spawn)
    from lmfleet.launch.ray_launcher import RayLauncher

    return RayLauncher(
        address=options.ray_address,
        placement=options.placement,
        max_restarts=options.max_restarts if options.restart == "on-failure" else 0,
        log_dir=str(options.log_dir) if options.log_dir else None,
    )
