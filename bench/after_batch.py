"""The proxy's chat throughput before and after it ran one batch (its Batch API).

A batch's openai client used to close the proxy's upstream pool when the batch
ended, so every later request opened a connection to its node and closed it after
the answer. Two fast sims and `lmfleet serve` from CHECKOUT (default: this one),
pinned as in `bench.proxy_overhead`; wrk's chat at c=32 for SECONDS, then a
three-line batch run to completion, then wrk again, counting the connections to
the nodes that this machine closed first meanwhile (TIME_WAIT).

    .venv/bin/python -m bench.after_batch [--checkout PATH] [--seconds 5]

For another checkout (a worktree of an older commit), the proxy is started with
`-m lmfleet.cli` from that directory (`start_lmfleet(checkout=...)`), so its package
is the one imported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import openai
import psutil

from bench._common import LOAD_CPU, MODEL, ROOT, pin_self, procs, start_sims, wrk
from bench.proxy_overhead import start_lmfleet


def closed_by_us(ports: set[int]) -> int:
    """Connections to `ports` this machine closed first and still waits out."""
    return sum(
        1
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_TIME_WAIT and c.raddr and c.raddr.port in ports
    )


def run_batch(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    line = {"method": "POST", "url": "/v1/chat/completions", "body": body}
    lines = "\n".join(json.dumps({"custom_id": f"r{i}", **line}) for i in range(3))
    uploaded = client.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).status != "completed":
        if time.monotonic() > deadline:
            raise RuntimeError("the batch did not complete in 60 s")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkout", type=Path, default=ROOT)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    pin_self()
    with procs() as group:
        nodes = start_sims(group, 2, LOAD_CPU, "--fast", "--output-tokens", "16")
        ports = {int(node.rsplit(":", 1)[1]) for node in nodes}
        url = start_lmfleet(group, nodes, checkout=args.checkout)[1]
        before = wrk(url, 32, args.seconds, stream=False)
        run_batch(url)
        waits = closed_by_us(ports)
        after = wrk(url, 32, args.seconds, stream=False)
        waits = closed_by_us(ports) - waits
        print(
            f"{args.checkout}: chat c=32 before the batch {before.rps:,.0f} req/s "
            f"(p99 {before.p99_ms:.1f} ms), after {after.rps:,.0f} req/s "
            f"(p99 {after.p99_ms:.1f} ms); connections to the nodes closed meanwhile: {waits}"
        )


if __name__ == "__main__":
    main()
