"""`lmfleet serve`: the proxy in the foreground. Flags mirror `lmdeploy serve proxy`.

Settings come from arguments and the environment here only:
`LMFLEET_NODE_API_KEY` (the nodes' key) and `LMFLEET_API_KEYS` (client keys,
comma-separated) are read when the matching flag is absent.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmfleet.cli import workers
from lmfleet.cli.node_flag import NODE_SETTINGS, parse_node_flag
from lmfleet.config import SHORTCUTS, FleetOptions, add_flags, given, with_values
from lmfleet.logs import configure_logging as setup_logging
from lmfleet.node.names import parse_alias_flag
from lmfleet.plain_errors import ConfigError, require_serve
from lmfleet.priority import parse_priority
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
    """`lmfleet serve`'s flags: every `lmdeploy serve proxy` flag (0.18) and lmfleet's own.

    The flags of option fields come from the fields (`add_flags`); the ones here
    mean more than one field (environment fallbacks, the state file) or no field.
    tests/cli/test_serve_flags.py reads LMDeploy's own parser and fails when a
    flag of it is missing here, so a flag LMDeploy adds later cannot go unnoticed.
    """
    add = parser.add_argument
    add(
        "--node",
        dest="nodes",
        action="append",
        default=[],
        metavar="URL[,NAME=VALUE...]",
        help="a node to route to (repeat), with its own settings after the URL: "
        + "; ".join(f"{name}: {what}" for name, what in NODE_SETTINGS.items())
        + " (e.g. --node http://old-box:23333,priority=50); nodes may also register via "
        "POST /nodes/add",
    )
    add(
        "--model-alias",
        dest="model_aliases",
        action="append",
        default=[],
        metavar="NAME=REAL[,REAL...]",
        help="a model alias (repeat): a request for NAME goes to any node serving one of "
        "the REAL names, under that node's own name",
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
        "--key-priority",
        dest="key_priorities",
        action="append",
        default=[],
        metavar="KEY=N",
        help="the default request priority of a client key (repeat): e.g. a batch job's "
        "key at -1 waits while the nodes are full, behind interactive requests",
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
        help="default %(default)s (LMDeploy's proxy: WARNING; REQUEST: DEBUG and --access-log)",
    )
    add(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="json: one JSON object per line, for log shippers (default %(default)s)",
    )
    add(
        "--disable-cache-status",
        action="store_true",
        help="keep no node list on disk: a restart forgets the nodes that registered "
        "(as LMDeploy's flag; default: kept in --state-dir; with --state-file or "
        "--state-dir it is an error)",
    )
    add(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the node list is kept across restarts, as serve-PORT.json "
        "(default $XDG_STATE_HOME/lmfleet, else ~/.local/state/lmfleet)",
    )
    add(
        "--state-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="keep the node list in this file instead of --state-dir's serve-PORT.json",
    )
    add(
        "--node-api-key",
        default=None,
        metavar="KEY",
        help="the nodes' own key (or LMFLEET_NODE_API_KEY; default: none)",
    )
    add_flags(parser.add_argument_group("proxy"), ProxyOptions)
    fleet = parser.add_argument_group("fleet")
    distserve = parser.add_argument_group("DistServe (with --serving-strategy DistServe)")
    add_flags(fleet, FleetOptions, sections={"distserve": distserve})


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
        for flag, value in (("--state-file", args.state_file), ("--state-dir", args.state_dir)):
            if value is not None:
                raise ConfigError(
                    f"--disable-cache-status and {flag} contradict each other: the state "
                    "file is lmfleet's node cache; drop one of them"
                )
        return None
    if args.state_file is not None:
        return Path(args.state_file)
    return state_path(args.state_dir or default_dir(), args.port)


def _key_priority(text: str) -> tuple[str, int]:
    """`--key-priority KEY=N` -> (KEY, N); `ConfigError` otherwise (the key itself is
    never repeated in the message)."""
    key, sep, value = text.rpartition("=")
    try:
        if not sep or not key:
            raise ValueError
        return key, parse_priority(value, "--key-priority")
    except ValueError:
        raise ConfigError("--key-priority expects KEY=N, N an integer priority") from None


def proxy_options(args: argparse.Namespace) -> ProxyOptions:
    """The proxy's options from the flags (client keys also from `LMFLEET_API_KEYS`)."""
    values = given(args, ProxyOptions)
    keys = args.api_keys
    if keys is None and os.environ.get("LMFLEET_API_KEYS"):
        keys = os.environ["LMFLEET_API_KEYS"].split(",")
    values[("api_keys",)] = tuple(k for k in keys or () if k)
    values[("key_priorities",)] = dict(_key_priority(text) for text in args.key_priorities)
    values[("state_file",)] = state = state_file_of(args)
    if state is not None:  # the Batch API's files and jobs, beside the node list
        values[("jobs_dir",)] = state.with_suffix(".jobs")
    values[("log_level",)] = "debug" if args.log_level == "REQUEST" else args.log_level.lower()
    if args.log_level == "REQUEST":
        values[("access_log",)] = True
    if args.ssl:
        values[("ssl_keyfile",)], values[("ssl_certfile",)] = _ssl_files()
    if getattr(args, "worker_hub", None) is not None:  # one worker of `--workers N`
        if state is None:  # one temporary jobs directory for all: the supervisor's
            values[("jobs_dir",)] = args.worker_hub.parent / "jobs"
        values[("listen_fd",)] = args.worker_fd
        values[("hub",)] = args.worker_hub
        values[("worker",)] = args.worker_index
        values[("workers",)] = args.worker_count
    return with_values(ProxyOptions, None, values)


def fleet_options(args: argparse.Namespace) -> FleetOptions:
    """The fleet's options from the flags that are no `LMFleet` keyword shortcut."""
    shortcuts = set(SHORTCUTS.values())
    values = given(args, FleetOptions)
    return with_values(FleetOptions, None, {p: v for p, v in values.items() if p not in shortcuts})


def fleet_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The `LMFleet` keyword shortcuts from the flags (`Flag.absent` ones only if given,
    so that `LMFleet.launch` defaults `min_ready` to its node count), and the aliases
    of `--model-alias`."""
    values = given(args, FleetOptions)
    keywords = {name: values[path] for name, path in SHORTCUTS.items() if path in values}
    if args.model_aliases:
        keywords["aliases"] = dict(parse_alias_flag(text) for text in args.model_aliases)
    return keywords


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM: the foreground commands poll it to stop cleanly."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


YOUNG_COLLECTION_EVERY = 20_000
"""Allocations between two young-generation collections in a proxy process (CPython's
default is 700)."""


def settle_garbage_collector() -> None:
    """Tune the collector for a process that is only a proxy, once it serves.

    What exists then (imports, the fleet, the app) lives as long as the process:
    `gc.freeze()` takes it out of every later collection, so a full collection no
    longer walks it; and a young collection every 20,000 allocations instead of 700
    lets most of a request's objects die by reference count first. Measured with
    bench/proxy_overhead.py (docs/benchmarks.md, "The collector"): p99 at 32
    connections 32-35 ms -> 10-11 ms, at 128 154-239 ms -> 52-72 ms, +5-13 % req/s.
    Only `lmfleet serve` does this: a notebook's process is the user's."""
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, 50, 100)


def serve_until_stopped(server: ProxyServer, stop: threading.Event) -> None:
    """Serve until Ctrl-C or SIGTERM sets `stop`, then stop the proxy (bounded)."""
    while not stop.wait(0.5):
        pass
    server.stop()


def run(args: argparse.Namespace) -> int:
    from lmfleet.fleet import LMFleet

    require_serve("lmfleet serve")
    configure_logging(args)
    if getattr(args, "workers", 1) > 1 and args.worker_hub is None:
        return workers.run(args, getattr(args, "command_argv", []))
    options = proxy_options(args)
    stop = stop_on_signals()
    nodes = [parse_node_flag(text) for text in args.nodes]
    settings, keywords = fleet_options(args), fleet_keywords(args)
    if args.worker_index > 0 and keywords.pop("auto_sleep_after", None) is not None:
        # One auto-sleeper per proxy (worker 0, which hears every worker's activity
        # through the shared facts); every worker still wakes a node on demand.
        settings = with_values(FleetOptions, settings, {("routing", "wake_on_demand"): True})
    fleet = LMFleet.attach(
        [node.url for node in nodes],
        node_options={node.url: node.options() for node in nodes if node.settings},
        allow_empty=True,  # nodes may register later through POST /nodes/add
        options=settings,
        strategy=args.strategy,
        api_key=node_api_key(args),
        **keywords,
    )
    try:
        server = fleet.serve(options=options)
        settle_garbage_collector()
        if getattr(args, "worker_hub", None) is None:  # a worker's supervisor says it once
            print(f"lmfleet proxy on {server.url} ({len(fleet.nodes)} node(s))", file=sys.stderr)
        serve_until_stopped(server, stop)
    finally:
        fleet.close()
    return 0
