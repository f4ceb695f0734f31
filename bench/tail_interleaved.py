"""Tails at c=128, interleaved: every proxy started at once, wrk on each in turn.

`bench.proxy_overhead` measures one proxy after another, so a p99 there is as much
the VM's mood at that minute as the proxy's. Here two fast sims, `lmfleet serve`
(`least_load`), `lmfleet serve --routing-strategy round_robin` and SMG (round
robin) run side by side, each pinned to the proxy's core, and wrk at c=128 visits
each in turn for ROUNDS rounds; the medians are printed at the end.

    .venv/bin/python -m bench.tail_interleaved [--rounds 4] [--seconds 5] [--stream]
"""

from __future__ import annotations

import argparse
import statistics

from bench._common import LOAD_CPU, WrkResult, pin_self, procs, start_sims, wrk
from bench.proxy_overhead import start_lmfleet, start_smg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--stream", action="store_true", help="SSE streams of 16 chunks")
    args = parser.parse_args()
    pin_self()
    with procs() as group:
        nodes = start_sims(group, 2, LOAD_CPU, "--fast", "--output-tokens", "16")
        proxies = {
            "lmfleet": start_lmfleet(group, nodes)[1],
            "lmfleet-rr": start_lmfleet(group, nodes, 1, "--routing-strategy", "round_robin")[1],
            "smg": start_smg(group, nodes)[1],
        }
        for url in proxies.values():
            wrk(url, 128, 2, stream=args.stream)  # warm-up
        runs: dict[str, list[WrkResult]] = {name: [] for name in proxies}
        for round_ in range(args.rounds):
            for name, url in proxies.items():
                result = wrk(url, 128, args.seconds, stream=args.stream)
                runs[name].append(result)
                print(
                    f"round {round_} {name:10s} {result.rps:7,.0f} req/s "
                    f"p50 {result.p50_ms:6.1f} p99 {result.p99_ms:7.1f} ms",
                    flush=True,
                )
        for name, results in runs.items():
            rps = statistics.median(r.rps for r in results)
            p99 = statistics.median(r.p99_ms for r in results)
            print(f"{name:10s} median {rps:,.0f} req/s, p99 {p99:.1f} ms")


if __name__ == "__main__":
    main()
