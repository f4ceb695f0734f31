"""Python calls per proxied request, counted by cProfile in the proxy's own loop thread.

Wall-clock A/Bs of `lmfleet serve` (proxy_overhead.py) vary by several percent from
run to run; the number of Python calls one request costs does not, and on this
path CPU follows it closely (a 9 % gap in calls showed as a ~9 % gap in CPU per
request, docs/benchmarks.md §1). This starts one `lmfleet sim --fast` node, a
fleet and its proxy in this process, sends N sequential non-streamed chat
requests through the proxy with the profiler enabled in the fleet's loop thread
(where the proxy runs), and prints the calls per request, or with `--diff` the
functions whose counts differ from a saved run.

    .venv/bin/python bench/proxy_calls.py --save /tmp/head.json
    .venv/bin/python bench/proxy_calls.py --alias --save /tmp/alias.json  # an alias, renamed
    .venv/bin/python bench/proxy_calls.py --stream  # SSE streams of 16 chunks
    (cd /path/to/base && PYTHONPATH=$PWD .venv/bin/python /path/to/bench/proxy_calls.py \\
        --save /tmp/base.json)
    .venv/bin/python bench/proxy_calls.py --diff /tmp/base.json /tmp/head.json

Run it as a script (not `-m`) with PYTHONPATH naming the checkout to count.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import httpx2

from bench._common import fast_sim_proxy

ALIAS = "bench-alias"


def count(requests: int, alias: bool = False, stream: bool = False) -> dict[str, float]:
    """Calls per request by function (file:name), through a fresh fleet and proxy;
    with `alias`, the requests name an alias of the node's model (renamed both ways);
    with `stream`, each is a stream of 16 chunks."""
    from lmfleet.sim.options import DEFAULT_MODEL

    aliases = {ALIAS: [DEFAULT_MODEL]} if alias else {}
    with fast_sim_proxy(aliases=aliases) as (fleet, proxy_url):
        url = proxy_url + "/v1/chat/completions"
        model = ALIAS if alias else fleet.model
        body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        if stream:
            body.update(stream=True, max_tokens=16)
        profile = cProfile.Profile()
        with httpx2.Client(timeout=10) as client:
            for _ in range(50):  # warm: connections, caches
                client.post(url, json=body).raise_for_status()
            fleet.runtime.call(profile.enable)
            for _ in range(requests):
                client.post(url, json=body)
            fleet.runtime.call(profile.disable)
    calls: dict[str, float] = {}
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    for (path, _, name), (_, primitive, *_) in stats.items():
        key = f"{path.split('site-packages/')[-1].split('lmfleet/', 1)[-1]}:{name}"
        calls[key] = calls.get(key, 0.0) + primitive / requests
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--save", type=Path, help="write the counts here (JSON)")
    parser.add_argument("--diff", type=Path, nargs=2, metavar=("BASE", "HEAD"))
    parser.add_argument(
        "--alias", action="store_true", help="requests name an alias of the node's model"
    )
    parser.add_argument("--stream", action="store_true", help="SSE streams of 16 chunks")
    args = parser.parse_args()
    if args.diff:
        base, head = (json.loads(p.read_text()) for p in args.diff)
        print(f"calls per request: {sum(base.values()):.0f} -> {sum(head.values()):.0f}")
        changed = sorted((head.get(k, 0) - base.get(k, 0), k) for k in base.keys() | head.keys())
        for delta, key in changed[:15] + changed[-25:]:
            if abs(delta) >= 0.5:
                print(f"{delta:+7.2f}  {key}")
        return
    started = time.monotonic()
    calls = count(args.requests, args.alias, args.stream)
    print(f"{sum(calls.values()):.0f} calls per request ({time.monotonic() - started:.0f} s)")
    if args.save:
        args.save.write_text(json.dumps(calls))


if __name__ == "__main__":
    main()
