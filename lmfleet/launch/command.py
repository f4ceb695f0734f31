"""Server command lines: templates with placeholders, and `server_args` as flags.

A node's command is a *template* so that any OpenAI-compatible server can be
launched the same way: a list of strings whose `{model}`, `{host}`, `{port}`,
`{tp}`, `{backend}`, `{python}` and `{index}` placeholders are filled per node,
or a callable that gets the same values as a `CommandContext` and returns argv.
LMDeploy's `api_server` and the simulator are two such templates. Rendering
happens where the node runs (a Ray actor picks its own host and port).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from lmfleet.plain_errors import ConfigError

LMDEPLOY_COMMAND: tuple[str, ...] = (
    "lmdeploy",
    "serve",
    "api_server",
    "{model}",
    "--server-name",
    "{host}",
    "--server-port",
    "{port}",
    "--tp",
    "{tp}",
    "--backend",
    "{backend}",
)
"""`lmdeploy serve api_server`, LMDeploy's OpenAI-compatible server."""

VLLM_COMMAND: tuple[str, ...] = (
    "vllm",
    "serve",
    "{model}",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--tensor-parallel-size",
    "{tp}",
    "--enable-sleep-mode",
)
"""`vllm serve` (vLLM 0.33, vllm/engine/arg_utils.py), able to sleep: with
`VLLM_ENV`, its sleep and abort routes exist (docs/guide/engines.md)."""

VLLM_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
"""vLLM registers `/sleep`, `/wake_up`, `/is_sleeping` and `/abort_requests` only
with this in its environment."""

SGLANG_COMMAND: tuple[str, ...] = (
    "{python}",
    "-m",
    "sglang.launch_server",
    "--model-path",
    "{model}",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--tp-size",
    "{tp}",
    "--enable-memory-saver",
    "--enable-weights-cpu-backup",
    "--enable-metrics",
)
"""SGLang 0.5.23's server (sglang/srt/arg_groups/fields/), able to release and
resume its memory (sleep; with its weights kept in CPU memory meanwhile, as a
level-1 sleep does on the other engines) and exporting the `/metrics` `least_load`
reads."""

ENGINE_COMMANDS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "lmdeploy": (LMDEPLOY_COMMAND, {}),
    "vllm": (VLLM_COMMAND, VLLM_ENV),
    "sglang": (SGLANG_COMMAND, {}),
}
"""Each engine's command template and the environment it needs."""

SIM_COMMAND: tuple[str, ...] = (
    "{python}",
    "-m",
    "lmfleet.sim",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--model",
    "{model}",
)
"""The emulated api_server (`lmfleet sim`): no GPU, same HTTP surface."""


@dataclass(frozen=True, slots=True)
class CommandContext:
    """The values a command template is filled with, for one node."""

    model: str
    host: str
    port: int
    tp: int = 1
    backend: str = "turbomind"
    index: int = 0
    python: str = sys.executable


CommandTemplate: TypeAlias = Sequence[str] | Callable[[CommandContext], Sequence[str]]
ServerArgValue: TypeAlias = str | int | float | bool | Sequence[str | int | float] | None


def server_args_to_flags(args: Mapping[str, ServerArgValue]) -> list[str]:
    """`{"session_len": 8192, "enable-prefix-caching": True}` -> argparse flags.

    Underscores become hyphens; True is a bare flag; False and None are left out
    (so a caller can switch a default flag off by not passing it); a list is
    given once after its flag, the way argparse's `nargs="+"` reads it
    (`--api-keys a b`), because repeating the flag would keep only the last one.
    """
    flags: list[str] = []
    for key, value in args.items():
        name = key if key.startswith("-") else "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(name)
        elif isinstance(value, (str, int, float)):
            flags += [name, str(value)]
        else:
            items = [str(v) for v in value]
            if not items:
                continue
            flags += [name, *items]
    return flags


def _resolve_executable(program: str) -> str:
    """A bare console-script name, looked up beside this interpreter first.

    A notebook kernel of a virtualenv often runs without the venv's `bin` on
    PATH; the `lmdeploy` script installed beside `sys.executable` is the one
    that matches the Python this fleet runs in.
    """
    if "/" in program:
        return program
    beside = Path(sys.executable).parent / program
    if beside.is_file():
        return str(beside)
    return shutil.which(program) or program


def render_command(
    template: CommandTemplate,
    context: CommandContext,
    *,
    server_args: Mapping[str, ServerArgValue] | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argv of one node: the filled template, then `server_args`, then `extra_args`."""
    if callable(template):
        argv = [str(part) for part in template(context)]
    else:
        values = {
            "model": context.model,
            "host": context.host,
            "port": context.port,
            "tp": context.tp,
            "backend": context.backend,
            "index": context.index,
            "python": context.python,
        }
        try:
            argv = [part.format(**values) for part in template]
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"bad command template {list(template)!r}: {exc!r} "
                "(placeholders: {model} {host} {port} {tp} {backend} {index} {python})"
            ) from exc
    if not argv:
        raise ConfigError("the command template produced an empty command")
    argv[0] = _resolve_executable(argv[0])
    return [*argv, *server_args_to_flags(server_args or {}), *extra_args]
