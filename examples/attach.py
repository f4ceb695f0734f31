"""Attach to api_servers that are already running and route a few requests over them.

    python examples/attach.py http://gpu1:23333 http://gpu2:23333
    python examples/attach.py            # no URLs: starts two simulated nodes to attach to

Nodes started with `lmdeploy serve api_server MODEL --server-port 23333` (add
`--api-keys KEY` and pass `--api-key KEY` here if they need one).
"""

from __future__ import annotations

import argparse

from lmfleet import LMFleet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("urls", nargs="*")
    parser.add_argument("--api-key", default=None, help="the nodes' key (never printed)")
    parser.add_argument("--strategy", default="least_load")
    args = parser.parse_args()

    helper = None
    urls = args.urls
    if not urls:  # demo mode: stand up two emulated nodes and attach to them
        helper = LMFleet.simulate(nodes=2, sim_args=("--ttft-ms", "5", "--tpot-ms", "2"))
        helper.wait_ready(timeout=60)
        urls = [n.url for n in helper.nodes]

    try:
        with LMFleet.attach(urls, strategy=args.strategy, api_key=args.api_key) as fleet:
            fleet.wait_ready(timeout=120, min_ready=1)
            client = fleet.client()
            for i in range(6):
                reply = client.chat.completions.create(
                    model=fleet.model,
                    messages=[{"role": "user", "content": f"Say hello #{i}"}],
                    max_tokens=16,
                )
                print(i, reply.choices[0].message.content)
            print(fleet)  # which node served how many
    finally:
        if helper is not None:
            helper.close()


if __name__ == "__main__":
    main()
