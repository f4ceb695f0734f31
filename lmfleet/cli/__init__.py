"""The `lmfleet` command. Settings come from arguments (and the environment) here only.

The subcommands live beside this file (`serve.py`, `launch.py`), except `lmfleet
sim`, which is the emulated server's own entry point (lmfleet/sim/cli.py) and
`lmfleet demo` (lmfleet/demo.py). This package is the top layer: it may import
the fleet, nothing imports it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from lmfleet.sim import cli as sim_cli

    sim = sub.add_parser("sim", help="run one emulated LMDeploy api_server")
    sim_cli.add_arguments(sim)
    sim.set_defaults(run=sim_cli.run)

    from lmfleet.cli import serve as serve_cli

    serve = sub.add_parser("serve", help="route over nodes as an HTTP proxy (lmdeploy serve proxy)")
    serve_cli.add_arguments(serve)
    serve.set_defaults(run=serve_cli.run)

    from lmfleet.cli import launch as launch_cli

    launch = sub.add_parser("launch", help="start api_server nodes and serve them as a proxy")
    launch_cli.add_arguments(launch)
    launch.set_defaults(run=launch_cli.run)

    from lmfleet import demo

    demo_parser = sub.add_parser("demo", help="simulated nodes + a routed workload")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)
