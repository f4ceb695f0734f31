"""Launch api_servers on a Ray cluster (one actor per node, `tp` GPUs each) and route to them.

    ray start --head            # or connect to an existing cluster (RAY_ADDRESS)
    python examples/launch_ray.py internlm/internlm2_5-7b-chat --nodes 8

Needs lmfleet's `ray` and `lmdeploy` extras (`pip install '.[ray,lmdeploy]'` in a clone)
on every Ray node.
"""

from __future__ import annotations

import argparse

from lmfleet import LMFleet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()

    with LMFleet.launch(args.model, nodes=args.nodes, tp=args.tp, launcher="ray") as fleet:
        fleet.wait_ready(timeout=1800)
        print(fleet)
        results = fleet.complete_many(
            [f"The capital of country #{i} is" for i in range(1000)], max_tokens=16
        )
        print(results.summary())


if __name__ == "__main__":
    main()
