"""The `lmfleet` command. Settings come from arguments (and the environment) here only.

The subcommands live beside this file (`serve.py`, `launch.py`), except `lmfleet
sim`, which is the emulated server's own entry point (lmfleet/sim/cli.py) and
`lmfleet demo` (lmfleet/demo.py). This package is the top layer: it may import
the fleet, nothing imports it.

Every subcommand ends the same way (`main`): a configuration or OS error is one
line, `lmfleet: error: ...`, and exit status 2 (argparse's own convention for
bad usage), with the traceback only under `--debug` or `LMFLEET_DEBUG=1`; Ctrl-C
and SIGTERM end quietly with status 0. Extras are imported by the subcommand that
runs, never while the parser is built, so `lmfleet --help` works on a core install.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from lmfleet.cli.failure import describe

DEBUG_ENV = "LMFLEET_DEBUG"
"""Set to 1 for tracebacks instead of one-line errors (like `--debug`)."""


def _debug_flag(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help=f"show tracebacks instead of one-line errors (or {DEBUG_ENV}=1)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmfleet", description=__doc__.split("\n\n")[0])
    _debug_flag(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        child = sub.add_parser(name, help=help, description=help)
        # SUPPRESS: `lmfleet serve --debug` and `lmfleet --debug serve` both work,
        # and the subcommand's default does not overwrite the top-level flag.
        _debug_flag(child, argparse.SUPPRESS)
        return child

    from lmfleet.sim import cli as sim_cli

    sim = command("sim", "run one emulated LMDeploy api_server")
    sim_cli.add_arguments(sim)
    sim.set_defaults(run=sim_cli.run)

    from lmfleet.cli import serve as serve_cli
    from lmfleet.cli import workers as serve_workers

    serve = command("serve", "route over nodes as an HTTP proxy (lmdeploy serve proxy)")
    serve_cli.add_arguments(serve)
    serve_workers.add_arguments(serve)
    serve.set_defaults(run=serve_cli.run)

    from lmfleet.cli import launch as launch_cli

    launch = command("launch", "start api_server nodes and serve them as a proxy")
    launch_cli.add_arguments(launch)
    launch.set_defaults(run=launch_cli.run)

    from lmfleet import demo

    demo_parser = command("demo", "simulated nodes + a routed workload")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; its errors become `lmfleet: error: ...` and status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    # A command's own arguments, as given (`serve --workers` starts its workers with them).
    args.command_argv = given[given.index("serve") + 1 :] if "serve" in given else []
    debug = bool(args.debug) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    # SIGTERM ends a command as Ctrl-C does: the `with` blocks close fleets and
    # nodes on the way out. `serve` and `launch` install their own handlers.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        failure = describe(exc)
        if failure is None or debug:
            raise
        headline, details = failure
        print(f"lmfleet: error: {headline}", file=sys.stderr)
        if details:
            print(details, file=sys.stderr)
        return 2
