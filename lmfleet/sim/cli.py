"""`lmfleet sim` / `python -m lmfleet.sim`: one emulated LMDeploy api_server.

Arguments (and LMDEPLOY_HEALTH_POLL_INTERVAL, as LMDeploy reads it) are read
here only; everything below works from a `SimOptions`.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

from lmfleet.config import add_flags, given, with_values
from lmfleet.plain_errors import ConfigError, require_serve
from lmfleet.sim.options import COST, FAULTS, SimOptions


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `lmfleet sim` option; LMDeploy's spellings are accepted where they exist.

    Each flag is its `SimOptions` field's (`config.Flag`): its name, default and help
    come from the field, so the help states the model's own defaults."""
    sections = {
        COST: parser.add_argument_group("cost model (ms on a speed-1 node)"),
        FAULTS: parser.add_argument_group("fault injection (also POST /sim/faults)"),
    }
    add_flags(parser, SimOptions, sections=sections)
    parser.add_argument(
        "--enable-metrics",
        action="store_true",
        dest="enable_metrics_accepted",  # no field: LMDeploy's flag, a no-op here
        help="accepted; /metrics is on by default",
    )


def options_from_args(args: argparse.Namespace) -> SimOptions:
    """The options the flags give; LMDEPLOY_HEALTH_POLL_INTERVAL when its flag is left out."""
    values = given(args, SimOptions)
    values.setdefault(
        ("health_poll_interval",),
        _env_float("LMDEPLOY_HEALTH_POLL_INTERVAL", SimOptions().health_poll_interval),
    )
    return with_values(SimOptions, None, values)


def _bind(host: str, port: int) -> socket.socket:
    """Reserve the port now, so that "port in use" is a one-line error, not uvicorn's exit.

    The socket is bound but not listening: uvicorn listens after the app's start-up
    (and `--startup-delay`), so the port still opens only when the node is up.
    `SO_REUSEADDR` always, `--port 0` too: a node restarted on its port binds over
    its old connections in TIME_WAIT only when the old socket set it as well (tried
    without it for a kernel-picked port: tests/test_fleet.py's restart then failed
    with "address already in use"). Its cost: two sockets that both set it may bind
    one port while neither listens; the kernel picks a port no socket holds when it
    can, so for `--port 0` that takes an exhausted port range.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or exc
        raise ConfigError(f"cannot serve on {host}:{port}: {reason}") from exc
    return sock


def _announce_when_listening(server: Any, url: str, model: str) -> None:
    """Print the node's URL once uvicorn accepts connections (a daemon thread polls)."""

    def wait() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        print(f"lmfleet sim: {model} on {url}", file=sys.stderr, flush=True)

    threading.Thread(target=wait, name="lmfleet sim announce", daemon=True).start()


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (uvicorn's clean shutdown)."""
    require_serve("lmfleet sim")
    import uvicorn

    from lmfleet.sim.app import create_app

    options = options_from_args(args)
    logging.basicConfig(level=options.log_level.upper(), format="%(levelname)s %(message)s")
    sock = _bind(options.host, options.port)
    port = sock.getsockname()[1]
    # `--port 0`: the port bound is the node's (its registration, its GPU uuids).
    options = options.model_copy(update={"port": port})
    config = uvicorn.Config(
        create_app(options),
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        access_log=False,
        log_level=options.log_level,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    host = f"[{options.host}]" if ":" in options.host else options.host
    _announce_when_listening(server, f"http://{host}:{port}", options.model_name)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
