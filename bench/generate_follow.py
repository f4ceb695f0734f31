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
import subprocess
import sys
import time

import httpx2


def main() -> None:
    from lmfleet import LMFleet
    from lmfleet.launch.process import free_port, wait_for_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1500)
    args = parser.parse_args()
    port = free_port()
    argv = [sys.executable, "-m", "lmfleet.sim", "--host", "127.0.0.1", "--port", str(port)]
    sim = subprocess.Popen([*argv, "--fast", "--output-tokens", "16"])
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        with LMFleet.attach([f"http://127.0.0.1:{port}"], health_interval=1.0) as fleet:
            fleet.wait_ready(timeout=30)
            proxy = fleet.serve(port=0)
            url = proxy.url + "/generate"
            with httpx2.Client(timeout=10) as client:
                for stream in (False, True):
                    body = {"input_ids": [1, 2, 3, 4], "max_tokens": 16, "stream": stream}
                    for _ in range(100):  # warm
                        client.post(url, json=body).raise_for_status()
                    started = time.perf_counter()
                    for _ in range(args.requests):
                        client.post(url, json=body)
                    rate = args.requests / (time.perf_counter() - started)
                    print(f"{'streamed' if stream else 'non-streamed'}: {rate:,.0f} req/s")
            proxy.stop()
    finally:
        sim.terminate()
        sim.wait(timeout=10)


if __name__ == "__main__":
    main()
