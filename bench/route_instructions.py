"""Instructions per routed request, counted by valgrind: the router's own cost, without noise.

Wall-clock A/B runs of the proxy and the client (proxy_overhead.py, client_overhead.py)
vary by a few percent from run to run on a shared machine, which hides a change of
that size. This counts the CPU instructions one request costs on the client path
(router -> plan -> steps -> lease and release, `FleetTransport` over an in-memory
node: httpx2's `MockTransport`, no sockets), which is deterministic to a fraction of
a percent. It runs the same loop with `--requests N` and with 0 under
`valgrind --tool=callgrind` and divides the difference by N, so interpreter start-up
and imports cancel out.

    .venv/bin/python -m bench.route_instructions [--requests 2000]
    PYTHONPATH=/path/to/other/checkout .venv/bin/python -m bench.route_instructions

The second form counts another checkout of lmfleet (an A/B against a base commit):
only names that every version exports are used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
ANSWER = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode()


def loop(requests: int, strategy: str, stream: bool) -> None:
    """What is counted: `requests` chat requests through the fleet's transport."""
    import httpx2

    from lmfleet.config import RoutingOptions
    from lmfleet.registry import NodeRegistry
    from lmfleet.routing import resolve_strategy
    from lmfleet.transport import FleetTransport, Router

    try:
        from lmfleet.node.state import NodeStatus
    except ImportError:  # before the node/ folder
        from lmfleet.state import NodeStatus  # type: ignore[no-redef]

    registry = NodeRegistry()
    for port in range(1, 5):
        url = f"http://127.0.0.1:{port}"
        registry.add(url, models=("m",))
        registry.modify(url, lambda s: s.evolve(status=NodeStatus.HEALTHY))
    router = Router(registry, resolve_strategy(strategy), RoutingOptions())

    def node(request: httpx2.Request) -> httpx2.Response:
        if stream:
            chunks = [b"data: {}\n\n"] * 16 + [b"data: [DONE]\n\n"]
            return httpx2.Response(
                200, headers={"content-type": "text/event-stream"}, content=iter(chunks)
            )
        return httpx2.Response(200, content=ANSWER, headers={"content-type": "application/json"})

    with httpx2.Client(transport=FleetTransport(router, httpx2.MockTransport(node))) as client:
        for _ in range(50):  # warm the caches both runs share
            client.post("http://placeholder/v1/chat/completions", content=BODY).read()
        for _ in range(requests):
            client.post("http://placeholder/v1/chat/completions", content=BODY).read()


def count(requests: int, strategy: str, stream: bool) -> int:
    """Instructions of one whole run of `loop` under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        argv = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "bench.route_instructions",
            "--inner",
            str(requests),
            "--strategy",
            strategy,
            *(["--stream"] if stream else []),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise RuntimeError(f"no instruction count in callgrind's output:\n{done.stderr}")
        return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--strategy", default="least_load")
    parser.add_argument("--stream", action="store_true", help="SSE answers of 16 events")
    parser.add_argument("--inner", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner is not None:
        loop(args.inner, args.strategy, args.stream)
        return
    import lmfleet

    base = count(0, args.strategy, args.stream)
    total = count(args.requests, args.strategy, args.stream)
    per = (total - base) / args.requests
    kind = "SSE x16" if args.stream else "non-streaming"
    print(
        f"{os.path.dirname(lmfleet.__file__)}: {args.strategy}, {kind}: "
        f"{per:,.0f} instructions per request ({args.requests} requests)"
    )


if __name__ == "__main__":
    main()
