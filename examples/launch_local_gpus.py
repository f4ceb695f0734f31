"""Launch one LMDeploy api_server per GPU group on this machine and run a batch.

    python examples/launch_local_gpus.py internlm/internlm2_5-7b-chat --nodes 4 --tp 1

Needs lmfleet's `lmdeploy` extra (`pip install '.[lmdeploy]'` in a clone) and GPUs.
Every node's log is available through `fleet.logs(url)`; closing the fleet ends every
server it started.
"""

from __future__ import annotations

import argparse

from lmfleet import LMFleet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--backend", default="turbomind")
    args = parser.parse_args()

    with LMFleet.launch(
        args.model,
        nodes=args.nodes,
        tp=args.tp,
        backend=args.backend,
        server_args={"session-len": 8192},
    ) as fleet:
        fleet.wait_ready(timeout=900)  # loading weights takes a while
        print(fleet)
        prompts = [
            [{"role": "user", "content": f"Write a haiku about GPU #{i}."}] for i in range(256)
        ]
        results = fleet.chat_many(prompts, concurrency=64, max_tokens=128, temperature=0.7)
        print(results.summary())
        print(results.texts[0])


if __name__ == "__main__":
    main()
