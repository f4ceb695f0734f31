"""`lmfleet serve`: the proxy in the foreground. Flags mirror `lmdeploy serve proxy`.

Settings come from arguments and the environment here only:
`LMFLEET_NODE_API_KEY` (the nodes' key) and `LMFLEET_API_KEYS` (client keys,
comma-separated) are read when the matching flag is absent.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from lmfleet.proxy.options import ProxyOptions

if TYPE_CHECKING:
    from lmfleet.proxy.server import ProxyServer

STRATEGIES = (
    "least_connections",
    "round_robin",
    "random",
    "power_of_two",
    "prefix_affinity",
    "min_observed_latency",
    "min_expected_latency",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ProxyOptions()
    add = parser.add_argument
    add(
        "--node",
        dest="nodes",
        action="append",
        default=[],
        metavar="URL",
        help="a node to route to (repeat); nodes may also register via POST /nodes/add",
    )
    add(
        "--server-name",
        "--host",
        dest="host",
        default=defaults.host,
        help="bind address (default 127.0.0.1; LMDeploy's proxy defaults to 0.0.0.0)",
    )
    add(
        "--server-port",
        "--port",
        dest="port",
        type=int,
        default=defaults.port,
        help="bind port (default 8000)",
    )
    add(
        "--routing-strategy",
        "--strategy",
        dest="strategy",
        default="least_connections",
        choices=STRATEGIES,
        help="how a node is picked per request",
    )
    add(
        "--serving-strategy",
        default="Hybrid",
        choices=("Hybrid", "DistServe"),
        help="DistServe: prefill on Prefill-role nodes, decode on Decode-role nodes "
        "(nodes announce their role at /nodes/add); see docs/distserve.md",
    )
    add(
        "--api-keys",
        nargs="+",
        default=None,
        metavar="KEY",
        help="keys clients must send as 'Authorization: Bearer KEY'",
    )
    add(
        "--admin-keys",
        nargs="+",
        default=None,
        metavar="KEY",
        help="keys for /nodes/* and /fleet/*; when set, client keys cannot register nodes",
    )
    add("--node-api-key", default=None, help="the nodes' own key (never shown to clients)")
    add(
        "--state-file",
        type=Path,
        default=None,
        help="JSON file that keeps registered nodes across restarts",
    )
    add("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    add(
        "--upstream-timeout",
        type=float,
        default=defaults.upstream_timeout,
        help="seconds to wait for a node's next byte before 504",
    )
    add("--health-interval", type=float, default=None, help="seconds between node probes")
    add(
        "--first-byte-timeout",
        type=float,
        default=None,
        help="seconds a node may stay silent before its first byte, then the request "
        "fails over to another node (default 300)",
    )
    add(
        "--wait-for-node",
        type=float,
        default=None,
        help="seconds a request waits for a healthy node before 503",
    )
    add("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    add("--access-log", action="store_true", help="log every request")


def configure_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def node_api_key(args: argparse.Namespace) -> str | None:
    """The nodes' key: `--node-api-key`, else `LMFLEET_NODE_API_KEY`."""
    return args.node_api_key or os.environ.get("LMFLEET_NODE_API_KEY") or None


def proxy_options(args: argparse.Namespace) -> ProxyOptions:
    """The proxy's options from the flags (client keys also from `LMFLEET_API_KEYS`)."""
    keys = args.api_keys
    if keys is None and os.environ.get("LMFLEET_API_KEYS"):
        keys = [k for k in os.environ["LMFLEET_API_KEYS"].split(",") if k]
    return ProxyOptions(
        host=args.host,
        port=args.port,
        api_keys=tuple(keys or ()),
        admin_keys=tuple(args.admin_keys or ()),
        state_file=args.state_file,
        max_body_bytes=args.max_body_bytes,
        upstream_timeout=args.upstream_timeout,
        log_level=args.log_level.lower(),
        access_log=args.access_log,
    )


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM: the foreground commands poll it to stop cleanly."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def serve_until_stopped(server: ProxyServer, stop: threading.Event) -> None:
    """Serve until Ctrl-C or SIGTERM sets `stop`, then stop the proxy (bounded)."""
    while not stop.wait(0.5):
        pass
    server.stop()


def run(args: argparse.Namespace) -> int:
    from lmfleet.fleet import LMFleet

    configure_logging(args)
    options = proxy_options(args)
    stop = stop_on_signals()
    fleet = LMFleet.attach(
        args.nodes,
        strategy=args.strategy,
        api_key=node_api_key(args),
        health_interval=args.health_interval,
        wait_for_node=args.wait_for_node,
        first_byte_timeout=args.first_byte_timeout,
        serving_strategy=args.serving_strategy,
    )
    try:
        server = fleet.serve(options=options)
        print(f"lmfleet proxy on {server.url} ({len(args.nodes)} node(s))", file=sys.stderr)
        serve_until_stopped(server, stop)
    finally:
        fleet.close()
    return 0
