"""`lmfleet launch MODEL`: start api_server nodes, then serve them as a proxy in the foreground.

The proxy flags are `lmfleet serve`'s own (`cli.serve.add_arguments`), so a
launched fleet is served exactly like an attached one; `--node` adds running
servers beside the launched ones. Ctrl-C or SIGTERM stops the proxy and every
node this command started.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
import time
from typing import TYPE_CHECKING

from lmfleet.cli import serve as serve_cli
from lmfleet.cli.node_flag import parse_node_flag
from lmfleet.cli.serve import (
    configure_logging,
    fleet_keywords,
    fleet_options,
    node_api_key,
    proxy_options,
    serve_until_stopped,
    stop_on_signals,
)
from lmfleet.config import add_flags, given
from lmfleet.launch.command import ServerArgValue, server_args_to_flags
from lmfleet.launch.options import LaunchOptions
from lmfleet.plain_errors import NotReadyError, require_serve

if TYPE_CHECKING:
    from lmfleet.fleet import LMFleet


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model path or id (passed to the server command)")
    group = parser.add_argument_group("launch")
    add = group.add_argument
    add(
        "--nodes",
        dest="count",
        type=int,
        default=1,
        metavar="N",
        help="how many servers to start (default %(default)s)",
    )
    add(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="tensor parallelism: GPUs per node (default %(default)s)",
    )
    add(
        "--engine",
        default="lmdeploy",
        choices=["lmdeploy", "vllm", "sglang"],
        help="which server to start, with the flags that let the fleet sleep it and "
        "read its load (default %(default)s; with --simulate: whose HTTP surface the "
        "sims speak)",
    )
    add(
        "--backend",
        default=None,
        choices=["turbomind", "pytorch"],
        help="LMDeploy's engine backend (default turbomind)",
    )
    add(
        "--server-arg",
        dest="server_args",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="extra server flag, repeatable: session-len=8192, enable-prefix-caching "
        "(with --simulate: lmfleet sim flags, e.g. speed=0.5)",
    )
    add(
        "--command",
        default=None,
        help="another server's command template, e.g. "
        "'vllm serve {model} --host {host} --port {port} -tp {tp}' "
        "(default: lmdeploy serve api_server)",
    )
    add(
        "--weight-updates",
        action="store_true",
        help="start servers that take RL weight updates (POST /fleet/update_weights): "
        "LMDeploy's PyTorch backend with the Ray executor, as "
        "LMFleet.launch(weight_updates=True); with --simulate, sims that do (default off)",
    )
    add("--simulate", action="store_true", help="start emulated nodes (no GPU) instead")
    add(
        "--ready-timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="seconds to wait for every node (default %(default)g)",
    )
    add_flags(group, LaunchOptions)
    serve_cli.add_arguments(parser)


def parse_server_args(items: list[str]) -> dict[str, ServerArgValue]:
    """`["session-len=8192", "enable-prefix-caching"]` -> `{"session-len": "8192", ...: True}`."""
    parsed: dict[str, ServerArgValue] = {}
    for item in items:
        key, sep, value = item.partition("=")
        parsed[key.strip().lstrip("-")] = value if sep else True
    return parsed


def run(args: argparse.Namespace) -> int:
    from lmfleet.fleet import LMFleet

    require_serve("lmfleet launch")
    configure_logging(args)
    options = proxy_options(args)
    stop = stop_on_signals()
    nodes = [parse_node_flag(text) for text in args.nodes]
    common = {
        "options": fleet_options(args),
        "strategy": args.strategy,
        **fleet_keywords(args),
        **{path[0]: value for path, value in given(args, LaunchOptions).items()},
    }
    if args.simulate:
        fleet = LMFleet.simulate(
            args.count,
            model=args.model,
            sim_args=server_args_to_flags(parse_server_args(args.server_args)),
            engine=args.engine,
            weight_updates=args.weight_updates,
            **common,
        )
    else:
        fleet = LMFleet.launch(
            args.model,
            args.count,
            tp=args.tp,
            backend=args.backend,
            server_args=parse_server_args(args.server_args),
            command=shlex.split(args.command) if args.command else None,
            api_key=node_api_key(args),
            engine=args.engine,
            weight_updates=args.weight_updates,
            **common,
        )
    try:
        for node in nodes:  # `--node URL`: running servers beside the launched ones
            fleet.add_node(node.url, options=node.options())
        server = fleet.serve(options=options)
        print(f"lmfleet proxy on {server.url}; starting {args.count} node(s)", file=sys.stderr)
        if _wait_ready(fleet, args.ready_timeout, stop):
            print(fleet.status().table(), file=sys.stderr)
            serve_until_stopped(server, stop)
    finally:
        fleet.close()
    return 0


def _wait_ready(fleet: LMFleet, timeout: float, stop: threading.Event) -> bool:
    """Wait for the nodes, staying responsive to Ctrl-C (then False).

    A node that failed to start raises `LaunchError`; nodes still not ready after
    `timeout` raise `NotReadyError`, each saying why (the CLI prints it as an error).
    """
    deadline = time.monotonic() + timeout
    while not stop.is_set():
        try:
            fleet.wait_ready(timeout=min(0.5, max(deadline - time.monotonic(), 0.0)))
            return True
        except NotReadyError as exc:
            if time.monotonic() >= deadline:
                # The per-node reasons stand; the headline's time is the whole wait.
                reasons = str(exc).partition("\n")[2]
                raise NotReadyError(f"nodes not ready after {timeout:g} s\n{reasons}") from exc
    return False
