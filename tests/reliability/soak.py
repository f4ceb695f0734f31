"""`make soak`: mixed load through a proxy process while chaos kills, restarts, sleeps and
wakes random nodes, and turns nodes into black holes (every generation a 500 while
`/health` stays green) or hung engines for a while. Prints what happened to every
request and the proxy's memory.

    .venv/bin/python tests/reliability/soak.py --minutes 10 [--nodes 4] [--concurrency 16]

Not part of `make test`. Exit status 1 when a request was lost or memory grew.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx2
import openai
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: loadgen

from loadgen import Report, run_load

from lmfleet.launch.process import ManagedProcess, free_port, wait_for_port

MODEL = "internlm/internlm2_5-7b-chat"
FIRST_BYTE_TIMEOUT = 2.0
"""The proxy's first-byte timeout: a hung node costs a request this, then a failover."""
FAULTS = {
    "black-hole": {"error_rate": 1.0, "error_status": 500},
    "hang": {"hang": True},
    "hang-after-head": {"hang_after_head": True},
}
HEALED = {"error_rate": 0.0, "hang": False, "hang_after_head": False}
SIM = ("--health-poll-interval", "1", "--ttft-ms", "20", "--tpot-ms", "5", "--output-tokens", "32")


class Cluster:
    """Sim nodes and one `lmfleet serve` process, all ended by `close()`."""

    def __init__(self, nodes: int, logs: Path) -> None:
        self.logs = logs
        self.ports = [free_port() for _ in range(nodes)]
        self.sims = {port: self._sim(port) for port in self.ports}
        for port in self.ports:
            wait_for_port("127.0.0.1", port, 30, self.sims[port])
        self.proxy_port = free_port()
        argv = [sys.executable, "-m", "lmfleet.cli", "serve", "--port", str(self.proxy_port)]
        argv += ["--health-interval", "0.5", "--log-level", "warning", "--disable-cache-status"]
        argv += ["--first-byte-timeout", str(FIRST_BYTE_TIMEOUT)]
        for port in self.ports:
            argv += ["--node", f"http://127.0.0.1:{port}"]
        self.proxy = ManagedProcess(argv, log_path=logs / "proxy.log")
        wait_for_port("127.0.0.1", self.proxy_port, 30, self.proxy)
        self.url = f"http://127.0.0.1:{self.proxy_port}"

    def _sim(self, port: int) -> ManagedProcess:
        argv = [sys.executable, "-m", "lmfleet.sim", "--port", str(port), *SIM]
        return ManagedProcess(argv, log_path=self.logs / f"sim-{port}.log")

    def close(self) -> None:
        self.proxy.terminate()
        for sim in self.sims.values():
            sim.terminate()


async def chaos(cluster: Cluster, until: float, rng: random.Random, log: list[str]) -> None:
    """Every couple of seconds: kill and restart a node, put one to sleep and wake it, or
    make one a black hole or a hung engine for a while (the router ejects it)."""
    async with httpx2.AsyncClient(timeout=30) as http:
        while time.monotonic() < until:
            await anyio.sleep(rng.uniform(1.0, 3.0))  # chaos pacing (all sleeps here), no sync
            port = rng.choice(cluster.ports)
            node = f"http://127.0.0.1:{port}"
            draw = rng.random()
            if draw < 0.5:
                fault = rng.choice(sorted(FAULTS))
                await http.post(node + "/sim/faults", json=FAULTS[fault])
                log.append(f"{fault} {port}")
                await anyio.sleep(rng.uniform(1.0, 3.0))
                await http.post(node + "/sim/faults", json=HEALED)
            elif draw < 0.75:
                cluster.sims[port].kill()
                log.append(f"kill {port}")
                await anyio.sleep(rng.uniform(0.5, 2.0))
                cluster.sims[port] = cluster._sim(port)
            else:
                await http.post(cluster.url + "/fleet/sleep", params={"node": node})
                log.append(f"sleep {port}")
                await anyio.sleep(rng.uniform(0.5, 2.0))
                await http.post(cluster.url + "/fleet/wakeup", params={"node": node})


async def soak(
    cluster: Cluster, seconds: float, concurrency: int, seed: int
) -> tuple[Report, list[str], list[float]]:
    total = Report()
    events: list[str] = []
    rss: list[float] = []
    until = time.monotonic() + seconds
    proxy = psutil.Process(cluster.proxy.pid)
    client = openai.AsyncOpenAI(
        base_url=cluster.url + "/v1", api_key="none", timeout=30, max_retries=2
    )

    async def sample_memory() -> None:
        while time.monotonic() < until:
            rss.append(proxy.memory_info().rss / 2**20)
            await anyio.sleep(5)  # the sampling period

    async with anyio.create_task_group() as tg:
        tg.start_soon(chaos, cluster, until, random.Random(seed), events)
        tg.start_soon(sample_memory)
        while time.monotonic() < until:
            report = await run_load(
                client, MODEL, total=concurrency * 10, concurrency=concurrency, bound=90.0
            )
            total.outcomes.update(report.outcomes)
            total.latencies.extend(report.latencies)
    return total, events, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cluster = Cluster(args.nodes, Path(tempfile.mkdtemp(prefix="lmfleet-soak-")))
    try:
        report, events, rss = anyio.run(
            soak, cluster, args.minutes * 60, args.concurrency, args.seed
        )
    finally:
        cluster.close()
    quarter = max(1, len(rss) // 4)
    early, late = statistics.mean(rss[:quarter] or [0]), statistics.mean(rss[-quarter:] or [0])
    growth = late - early
    print(f"soak: {args.minutes:g} min, {args.nodes} nodes, concurrency {args.concurrency}")
    kinds = Counter(e.split()[0] for e in events)
    print(
        f"chaos events: {len(events)} ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})"
    )
    print(f"{'requests sent':<32}{report.sent:>10}")
    print(f"{'succeeded':<32}{report.ok:>10}")
    print(f"{'failed with a clear error':<32}{report.clear_errors:>10}")
    for outcome, count in sorted(report.outcomes.items()):
        if outcome not in ("ok", "lost"):
            print(f"  {outcome:<30}{count:>10}")
    print(f"{'lost (must be 0)':<32}{report.lost:>10}")
    print(f"{'p99 latency':<32}{report.p99():>9.2f}s")
    print(f"{'proxy RSS first/last quarter':<32}{early:>6.1f} / {late:.1f} MiB ({growth:+.1f})")
    print(f"logs: {cluster.logs}")
    return 1 if report.lost or growth > 20 else 0


if __name__ == "__main__":
    sys.exit(main())
