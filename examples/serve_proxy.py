"""Serve a fleet as an HTTP proxy: a drop-in for `lmdeploy serve proxy`.

    python examples/serve_proxy.py --node http://gpu1:23333 --node http://gpu2:23333
    python examples/serve_proxy.py --simulate 3        # no GPU: emulated nodes

Clients then use `http://127.0.0.1:8000/v1` as their OpenAI base URL, and nodes
started with `lmdeploy serve api_server ... --proxy-url http://127.0.0.1:8000`
register themselves. Ctrl-C stops the proxy and the fleet.
"""

from __future__ import annotations

import argparse
import time

from lmfleet import LMFleet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--node", action="append", default=[], help="api_server URL")
    parser.add_argument("--simulate", type=int, default=0, help="start N emulated nodes")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--strategy", default="least_load")
    args = parser.parse_args()

    if args.simulate:
        fleet = LMFleet.simulate(nodes=args.simulate, strategy=args.strategy)
    else:
        fleet = LMFleet.attach(args.node, strategy=args.strategy)
    with fleet:
        server = fleet.serve(port=args.port)
        print(f"proxy on {server.url} (OpenAI base URL {server.url}/v1); Ctrl-C to stop")
        try:
            while True:
                time.sleep(5)
                print(fleet.status().table())
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()


if __name__ == "__main__":
    main()
