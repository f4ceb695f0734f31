"""What following a `/generate` costs the proxy: sequential requests per second.

Every token-making `/generate` is followed event by event (transport/continuation.py)
so that a cut generation can go on elsewhere; before, the proxy relayed its bytes.
This starts one `lmfleet sim --fast --output-tokens 16` node and a fleet with its
proxy in this process, and sends `--requests` sequential `/generate` requests
(4 prompt ids, 16 tokens), non-streamed then streamed, through the proxy. Run it
from each checkout to compare (`PYTHONPATH` naming the checkout, as a script):

    PYTHONPATH=$PWD .venv/bin/python bench/generate_follow.py [--requests 1500]
"""

from __future__ import annotations

import argparse
import time

import httpx2

from bench._common import fast_sim_proxy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1500)
    args = parser.parse_args()
    with fast_sim_proxy() as (_, proxy_url), httpx2.Client(timeout=10) as client:
        url = proxy_url + "/generate"
        for stream in (False, True):
            body = {"input_ids": [1, 2, 3, 4], "max_tokens": 16, "stream": stream}
            for _ in range(100):  # warm
                client.post(url, json=body).raise_for_status()
            started = time.perf_counter()
            for _ in range(args.requests):
                client.post(url, json=body)
            rate = args.requests / (time.perf_counter() - started)
            print(f"{'streamed' if stream else 'non-streamed'}: {rate:,.0f} req/s")


if __name__ == "__main__":
    main()
