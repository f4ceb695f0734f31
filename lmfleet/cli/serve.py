"""`lmfleet serve`: the proxy in the foreground. Flags mirror `lmdeploy serve proxy`.

Settings come from arguments and the environment here only:
`LMFLEET_NODE_API_KEY` (the nodes' key) and `LMFLEET_API_KEYS` (client keys,
comma-separated) are read when the matching flag is absent.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from lmfleet.config import DistServeOptions, FleetKeywords, FleetOptions, RoutingOptions
from lmfleet.errors import ConfigError
from lmfleet.extras import require_serve
from lmfleet.logs import configure_logging as setup_logging
from lmfleet.proxy.options import ProxyOptions
from lmfleet.proxy.state_file import default_dir, state_path
from lmfleet.routing import DEFAULT_STRATEGY

if TYPE_CHECKING:
    from lmfleet.proxy.server import ProxyServer

LMDEPLOY_STRATEGIES = ("random", "min_expected_latency", "min_observed_latency")
"""`lmdeploy serve proxy --routing-strategy` choices (0.18); lmfleet runs each of them."""

STRATEGIES = (
    "least_load",
    "least_connections",
    "round_robin",
    "power_of_two",
    "prefix_affinity",
    *LMDEPLOY_STRATEGIES,
)

LOG_LEVELS = ("CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET", "REQUEST")
"""LMDeploy's `--log-level` choices. REQUEST is LMDeploy's own level for per-request
lines; here it means DEBUG with the access log on."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`lmfleet serve`'s flags: every `lmdeploy serve proxy` flag (0.18), then lmfleet's own.

    tests/proxy/test_cli_flags.py reads LMDeploy's own parser and fails when a
    flag of it is missing here, so a flag LMDeploy adds later cannot go unnoticed.
    """
    defaults = ProxyOptions()
    distserve = DistServeOptions()
    fleet = FleetOptions()  # the defaults of the flags that default to None below
    add = parser.add_argument
    add(
        "--server-name",
        "--host",
        dest="host",
        default=defaults.host,
        help="bind address (default %(default)s, this machine only; LMDeploy's proxy "
        "defaults to 0.0.0.0: give --server-name 0.0.0.0 for nodes on other hosts)",
    )
    add(
        "--server-port",
        "--port",
        dest="port",
        type=int,
        default=defaults.port,
        help="bind port (default %(default)s)",
    )
    add(
        "--serving-strategy",
        default=fleet.serving_strategy,
        choices=("Hybrid", "DistServe"),
        help="DistServe: prefill on Prefill-role nodes, decode on Decode-role nodes "
        "(nodes announce their role at /nodes/add; docs/distserve.md); default %(default)s",
    )
    add(
        "--routing-strategy",
        "--strategy",
        dest="strategy",
        default=DEFAULT_STRATEGY,
        choices=STRATEGIES,
        help=f"how a node is picked per request (default {DEFAULT_STRATEGY}; "
        "LMDeploy's default is min_expected_latency)",
    )
    add(
        "--api-keys",
        nargs="*",
        default=None,
        metavar="KEY",
        help="keys clients must send as 'Authorization: Bearer KEY' (or LMFLEET_API_KEYS; "
        "default: none, no key needed)",
    )
    add(
        "--ssl",
        action="store_true",
        help="serve HTTPS with the key and certificate named by the SSL_KEYFILE and "
        "SSL_CERTFILE environment variables (as LMDeploy)",
    )
    add(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="default %(default)s (LMDeploy's proxy: WARNING)",
    )
    add(
        "--disable-cache-status",
        action="store_true",
        help="keep no node list on disk: a restart forgets the nodes that registered "
        "(as LMDeploy's flag; default: kept in --state-dir; with --state-file or "
        "--state-dir it is an error)",
    )
    ds = parser.add_argument_group("DistServe (with --serving-strategy DistServe)")
    ds.add_argument(
        "--migration-protocol",
        default=distserve.migration_protocol,
        choices=("RDMA", "NVLINK"),
        help="KV cache migration protocol between prefill and decode nodes (default %(default)s)",
    )
    ds.add_argument(
        "--link-type",
        default=distserve.link_type,
        choices=("RoCE", "IB"),
        help="RDMA link (default %(default)s)",
    )
    ds.add_argument(
        "--disable-gdr",
        action="store_true",
        help="no GPU Direct RDMA (LMDeploy 0.18's proxy accepts this flag but ignores it)",
    )
    ds.add_argument(
        "--dummy-prefill",
        action="store_true",
        help="profile decode alone: no prefill node is called, decode nodes get a dummy "
        "migration (LMDeploy's meaning)",
    )

    own = parser.add_argument_group("lmfleet")
    own.add_argument(
        "--node",
        dest="nodes",
        action="append",
        default=[],
        metavar="URL",
        help="a node to route to (repeat); nodes may also register via POST /nodes/add",
    )
    own.add_argument(
        "--admin-keys",
        nargs="+",
        default=None,
        metavar="KEY",
        help="keys for /nodes/* and /fleet/*; when set, client keys cannot register nodes "
        "(default: none, client keys open them)",
    )
    own.add_argument(
        "--node-api-key",
        default=None,
        metavar="KEY",
        help="the nodes' own key (or LMFLEET_NODE_API_KEY; default: none)",
    )
    own.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the node list is kept across restarts, as serve-PORT.json "
        "(default $XDG_STATE_HOME/lmfleet, else ~/.local/state/lmfleet)",
    )
    own.add_argument(
        "--state-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="keep the node list in this file instead of --state-dir's serve-PORT.json",
    )
    own.add_argument(
        "--min-ready",
        type=int,
        default=None,
        metavar="N",
        help=f"healthy nodes /readiness waits for (default {fleet.min_ready}; "
        "lmfleet launch: every launched node)",
    )
    own.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        metavar="N",
        help="request bodies above N bytes get a 413 "
        f"(default %(default)s, {defaults.max_body_bytes / 2**20:g} MiB)",
    )
    own.add_argument(
        "--max-connections",
        type=int,
        default=fleet.routing.max_connections,
        metavar="N",
        help="open connections to the nodes at most (requests past it wait; default %(default)s)",
    )
    own.add_argument(
        "--upstream-timeout",
        type=float,
        default=defaults.upstream_timeout,
        metavar="SECONDS",
        help="seconds to wait for a node's next byte before 504 (default %(default)g)",
    )
    own.add_argument(
        "--health-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"seconds between node probes (default {fleet.health.interval:g})",
    )
    own.add_argument(
        "--first-byte-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds a node may stay silent before its first byte, then the request "
        f"fails over to another node (default {fleet.routing.first_byte_timeout:g})",
    )
    own.add_argument(
        "--wait-for-node",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds a request waits for a healthy node before 503 "
        f"(default {fleet.routing.wait_for_node:g})",
    )
    own.add_argument(
        "--admission-queue",
        type=int,
        default=None,
        metavar="N",
        help="requests that may wait for a healthy node at once; one more gets 503 with "
        f"Retry-After at once (default {fleet.routing.admission_queue})",
    )
    own.add_argument(
        "--auto-sleep-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="put a node to sleep after this many seconds without requests; a request "
        "that finds every node asleep wakes one (default: never)",
    )
    own.add_argument(
        "--auto-sleep-level",
        type=int,
        default=fleet.auto_sleep_level,
        choices=(1, 2),
        help="LMDeploy sleep level for --auto-sleep-after (default %(default)s)",
    )
    own.add_argument(
        "--weight-version",
        type=int,
        default=None,
        metavar="N",
        help=f"the weight version the nodes start with (default {fleet.weight_version})",
    )
    own.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="json: one JSON object per line, for log shippers (default %(default)s)",
    )
    own.add_argument("--access-log", action="store_true", help="log every request")


def configure_logging(args: argparse.Namespace) -> None:
    level = "DEBUG" if args.log_level == "REQUEST" else args.log_level
    setup_logging(level, args.log_format)


def node_api_key(args: argparse.Namespace) -> str | None:
    """The nodes' key: `--node-api-key`, else `LMFLEET_NODE_API_KEY`."""
    return args.node_api_key or os.environ.get("LMFLEET_NODE_API_KEY") or None


def _ssl_files() -> tuple[Path, Path]:
    """LMDeploy's `--ssl`: the key and certificate from SSL_KEYFILE and SSL_CERTFILE."""
    missing = [name for name in ("SSL_KEYFILE", "SSL_CERTFILE") if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"--ssl needs the environment variable(s) {' and '.join(missing)}")
    return Path(os.environ["SSL_KEYFILE"]), Path(os.environ["SSL_CERTFILE"])


def state_file_of(args: argparse.Namespace) -> Path | None:
    """Where `lmfleet serve` keeps its node list: `--state-file`, else `--state-dir`'s
    (or the default state directory's) `serve-PORT.json`; None with
    `--disable-cache-status`, which contradicts either flag."""
    if args.disable_cache_status:
        for flag, given in (("--state-file", args.state_file), ("--state-dir", args.state_dir)):
            if given is not None:
                raise ConfigError(
                    f"--disable-cache-status and {flag} contradict each other: the state "
                    "file is lmfleet's node cache; drop one of them"
                )
        return None
    if args.state_file is not None:
        return Path(args.state_file)
    return state_path(args.state_dir or default_dir(), args.port)


def proxy_options(args: argparse.Namespace) -> ProxyOptions:
    """The proxy's options from the flags (client keys also from `LMFLEET_API_KEYS`)."""
    state = state_file_of(args)
    keys = args.api_keys
    if keys is None and os.environ.get("LMFLEET_API_KEYS"):
        keys = [k for k in os.environ["LMFLEET_API_KEYS"].split(",") if k]
    keyfile, certfile = _ssl_files() if args.ssl else (None, None)
    return ProxyOptions(
        host=args.host,
        port=args.port,
        api_keys=tuple(k for k in keys or () if k),
        admin_keys=tuple(args.admin_keys or ()),
        state_file=state,
        max_body_bytes=args.max_body_bytes,
        upstream_timeout=args.upstream_timeout,
        log_level="debug" if args.log_level == "REQUEST" else args.log_level.lower(),
        access_log=args.access_log or args.log_level == "REQUEST",
        ssl_keyfile=keyfile,
        ssl_certfile=certfile,
    )


def fleet_options(args: argparse.Namespace) -> FleetOptions:
    """The fleet's options from the flags that have no `LMFleet` keyword shortcut."""
    return FleetOptions(
        routing=RoutingOptions(max_connections=args.max_connections),
        distserve=DistServeOptions(
            migration_protocol=args.migration_protocol,
            link_type=args.link_type,
            with_gdr=not args.disable_gdr,
            dummy_prefill=args.dummy_prefill,
        ),
        auto_sleep_level=args.auto_sleep_level,
    )


def fleet_keywords(args: argparse.Namespace) -> FleetKeywords:
    """The `LMFleet` keyword shortcuts from the flags (an absent flag is None: skipped)."""
    return FleetKeywords(
        health_interval=args.health_interval,
        wait_for_node=args.wait_for_node,
        first_byte_timeout=args.first_byte_timeout,
        min_ready=args.min_ready,
        auto_sleep_after=args.auto_sleep_after,
        admission_queue=args.admission_queue,
        weight_version=args.weight_version,
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

    require_serve("lmfleet serve")
    configure_logging(args)
    options = proxy_options(args)
    stop = stop_on_signals()
    keywords = fleet_keywords(args)
    keywords["serving_strategy"] = args.serving_strategy
    fleet = LMFleet.attach(
        args.nodes,
        allow_empty=True,  # nodes may register later through POST /nodes/add
        options=fleet_options(args),
        strategy=args.strategy,
        api_key=node_api_key(args),
        **keywords,
    )
    try:
        server = fleet.serve(options=options)
        print(f"lmfleet proxy on {server.url} ({len(args.nodes)} node(s))", file=sys.stderr)
        serve_until_stopped(server, stop)
    finally:
        fleet.close()
    return 0
