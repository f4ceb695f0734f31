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

from lmfleet.errors import ConfigError, require_serve
from lmfleet.sim.options import SimOptions


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `lmfleet sim` option; LMDeploy's spellings are accepted where they exist.

    Defaults come from `SimOptions`, so the help states the model's own defaults."""
    d = SimOptions()
    add = parser.add_argument
    add("--host", "--server-name", default=d.host, help="bind address (default %(default)s)")
    add(
        "--port",
        "--server-port",
        type=int,
        default=d.port,
        help="bind port (default %(default)s, LMDeploy's)",
    )
    add("--model", default=d.model, help="model path/name the node serves (default %(default)s)")
    add(
        "--served-model-name",
        "--model-name",
        default=d.served_model_name,
        help="name clients send (default: --model)",
    )
    add(
        "--api-keys",
        nargs="+",
        default=list(d.api_keys),
        metavar="KEY",
        help="require Bearer KEY (default: no key needed)",
    )
    add(
        "--proxy-url",
        default=d.proxy_url,
        help="register at PROXY/nodes/add on start-up, once (default: register nowhere)",
    )
    add(
        "--role",
        choices=["hybrid", "prefill", "decode"],
        default=d.role,
        type=str.lower,
        help="DistServe role announced at /nodes/add (default %(default)s)",
    )
    add(
        "--allow-terminate-by-client",
        action="store_true",
        help="answer POST /terminate by exiting (as LMDeploy's flag)",
    )
    add(
        "--enable-abort-handling",
        action="store_true",
        help="serve POST /abort_request (else 501, as LMDeploy)",
    )
    add("--enable-metrics", action="store_true", help="accepted; /metrics is on by default")
    add("--disable-metrics", action="store_true", help="no /metrics (as LMDeploy's flag)")
    add(
        "--health-poll-interval",
        type=float,
        default=_env_float("LMDEPLOY_HEALTH_POLL_INTERVAL", d.health_poll_interval),
        help="seconds /health may lag the engine, 0 = live (default %(default)g: "
        "LMDEPLOY_HEALTH_POLL_INTERVAL when set, as LMDeploy reads it)",
    )
    add("--log-level", default=d.log_level, type=str.lower, help="default %(default)s")
    add(
        "--backend",
        choices=["turbomind", "pytorch"],
        default=d.backend,
        help="engine emulated (default %(default)s, LMDeploy's); decides the weight-update routes",
    )
    add(
        "--distributed-executor-backend",
        choices=["uni", "mp", "ray"],
        default=d.distributed_executor_backend,
        help=f"pytorch executor; LMDeploy 0.18 loads pushed weights only with ray "
        f"(default: {d.executor})",
    )
    add(
        "--logprobs-mode",
        choices=["raw_logits", "raw_logprobs"],
        default=d.logprobs_mode,
        help="pytorch: serve logprobs (default: none, so refused with a 400 as LMDeploy does); "
        "turbomind always serves them",
    )

    cost = parser.add_argument_group("cost model (ms on a speed-1 node)")
    cost.add_argument("--fast", action="store_true", help="no sleeps, no scheduler")
    cost.add_argument(
        "--speed", type=float, default=d.speed, help="0.333 = 3x slower (default %(default)g)"
    )
    cost.add_argument(
        "--ttft-ms",
        type=float,
        default=d.ttft_ms,
        help="time to the first token (default %(default)g)",
    )
    cost.add_argument(
        "--prefill-ms-per-token",
        type=float,
        default=d.prefill_ms_per_token,
        help="prefill time per uncached prompt token (default %(default)g)",
    )
    cost.add_argument(
        "--tpot-ms",
        type=float,
        default=d.tpot_ms,
        help="time per output token of one sequence (default %(default)g)",
    )
    cost.add_argument(
        "--batch-slowdown",
        type=float,
        default=d.batch_slowdown,
        help="per-token time grows by this fraction per extra running sequence "
        "(default %(default)g)",
    )
    cost.add_argument(
        "--max-batch",
        type=int,
        default=d.max_batch,
        help="sequences decoded at once; more wait (default %(default)s)",
    )
    cost.add_argument(
        "--prefix-cache-blocks",
        type=int,
        default=d.prefix_cache_blocks,
        help="prefix cache size in blocks (default %(default)s)",
    )
    cost.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the generated text and faults (default %(default)s)",
    )
    cost.add_argument(
        "--weights-gb",
        type=float,
        default=d.weights_gb,
        help="model size for the weight-update cost (default %(default)g)",
    )
    cost.add_argument(
        "--update-seconds-per-gb",
        type=float,
        default=d.update_seconds_per_gb,
        help="a finished weight update takes weights-gb times this (server stays "
        "responsive; default %(default)g)",
    )
    cost.add_argument(
        "--output-tokens",
        type=int,
        default=d.output_tokens,
        help="natural output length when max_tokens allows it (default %(default)s)",
    )
    cost.add_argument(
        "--output-tokens-max",
        type=int,
        default=d.output_tokens_max,
        help="vary the natural length in [output-tokens, this] by prompt hash "
        "(default: no variation)",
    )

    faults = parser.add_argument_group("fault injection (also POST /sim/faults)")
    faults.add_argument(
        "--startup-delay",
        type=float,
        default=d.startup_delay,
        help="seconds before the port opens (default %(default)g)",
    )
    faults.add_argument(
        "--initializing-for",
        type=float,
        default=d.initializing_for,
        help="seconds /health says initializing (503) after start (default %(default)g)",
    )
    faults.add_argument(
        "--error-rate",
        type=float,
        default=d.error_rate,
        help="fraction of inference requests answered with --error-status (default %(default)g)",
    )
    faults.add_argument(
        "--error-status",
        type=int,
        default=d.error_status,
        choices=[500, 502, 503, 504],
        help="status of the injected errors (default %(default)s)",
    )
    faults.add_argument("--hang", action="store_true", help="inference never answers")
    faults.add_argument(
        "--hang-after-head",
        action="store_true",
        help="inference sends a 200 event-stream head, then nothing (a wedged engine)",
    )
    faults.add_argument("--hang-health", action="store_true", help="/health never answers")
    faults.add_argument(
        "--crash-after",
        type=int,
        default=d.crash_after,
        help="serve N inference requests, then exit hard on the next (default: never)",
    )
    faults.add_argument(
        "--drop-stream-after",
        type=int,
        default=d.drop_stream_after,
        help="cut streams after K chunks, without [DONE] (default: never)",
    )
    faults.add_argument("--unhealthy", action="store_true", help="/health says unhealthy")
    faults.add_argument(
        "--update-weights-error",
        type=int,
        default=d.update_weights_error,
        metavar="STATUS",
        help="/update_weights and /update_weights_from_distributed fail with STATUS "
        "(default: they succeed)",
    )


def options_from_args(args: argparse.Namespace) -> SimOptions:
    return SimOptions(
        host=args.host,
        port=args.port,
        model=args.model,
        served_model_name=args.served_model_name,
        api_keys=tuple(args.api_keys),
        proxy_url=args.proxy_url,
        role=args.role,
        allow_terminate_by_client=args.allow_terminate_by_client,
        enable_abort_handling=args.enable_abort_handling,
        enable_metrics=not args.disable_metrics,
        health_poll_interval=args.health_poll_interval,
        log_level=args.log_level,
        backend=args.backend,
        distributed_executor_backend=args.distributed_executor_backend,
        logprobs_mode=args.logprobs_mode,
        fast=args.fast,
        speed=args.speed,
        ttft_ms=args.ttft_ms,
        prefill_ms_per_token=args.prefill_ms_per_token,
        tpot_ms=args.tpot_ms,
        batch_slowdown=args.batch_slowdown,
        max_batch=args.max_batch,
        prefix_cache_blocks=args.prefix_cache_blocks,
        seed=args.seed,
        weights_gb=args.weights_gb,
        update_seconds_per_gb=args.update_seconds_per_gb,
        output_tokens=args.output_tokens,
        output_tokens_max=args.output_tokens_max,
        startup_delay=args.startup_delay,
        initializing_for=args.initializing_for,
        error_rate=args.error_rate,
        error_status=args.error_status,
        hang=args.hang,
        hang_after_head=args.hang_after_head,
        hang_health=args.hang_health,
        crash_after=args.crash_after,
        drop_stream_after=args.drop_stream_after,
        health_fault="unhealthy" if args.unhealthy else None,
        update_weights_error=args.update_weights_error,
    )


def _bind(host: str, port: int) -> socket.socket:
    """Reserve the port now, so that "port in use" is a one-line error, not uvicorn's exit.

    The socket is bound but not listening: uvicorn listens after the app's start-up
    (and `--startup-delay`), so the port still opens only when the node is up.
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
