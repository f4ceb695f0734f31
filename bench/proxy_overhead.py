"""Proxy overhead: `lmfleet serve` vs `lmdeploy serve proxy` vs nginx vs direct.

Two `lmfleet sim --fast --output-tokens 16` nodes; each proxy is one process pinned
to core 0 and gets both nodes through `POST /nodes/add` with LMDeploy's JSON (nginx:
a static `least_conn` upstream). wrk (and the nodes, and this script) run on core 1.
For each proxy: non-streaming and SSE streaming (16 chunks) at 1, 32 and 128
connections, then time to first token from a sequential Python streaming client.
Proxy CPU per request is the utime+stime delta of its process tree over the wrk
run divided by the requests wrk completed.

    .venv/bin/python -m bench.proxy_overhead [--seconds 5] [--only lmfleet,direct]

From a worktree, run it with `-m` from the worktree's root: run as a file, it imports
`bench` (and so serves the proxy) from the checkout the venv was installed from.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx2

from bench._common import (
    LOAD_CPU,
    MODEL,
    PROXY_CPU,
    PY,
    ROOT,
    Procs,
    cpu_seconds,
    free_port,
    get_json,
    load_average,
    machine,
    pin_self,
    post_json,
    procs,
    save_json,
    start_sims,
    table,
    wait_http,
    wrk,
)

CONCURRENCY = (1, 32, 128)
LMDEPLOY_PY = os.environ.get("LMDEPLOY_PYTHON", str(ROOT / ".venv-peer" / "bin" / "python"))
SMG = os.environ.get("SMG", str(ROOT / ".venv-smg" / "bin" / "smg"))
"""Shepherd Model Gateway (Rust), `make smg`."""
NGINX_CONF = """worker_processes 1;
worker_cpu_affinity {mask};
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  upstream nodes {{ least_conn; {servers} keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://nodes;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def register(proxy: str, nodes: list[str]) -> None:
    for node in nodes:
        post_json(proxy + "/nodes/add", {"url": node, "status": {"models": [MODEL], "role": 1}})


def start_lmfleet(
    group: Procs, nodes: list[str], workers: int = 1, *flags: str, checkout: Path = ROOT
) -> tuple[int, str]:
    """`lmfleet serve` over `nodes`, registered as LMDeploy's nodes register; started
    with `-m` from `checkout`, whose package it then runs (another commit's worktree)."""
    port = free_port()
    argv = [PY, "-m", "lmfleet.cli", "serve", "--port", str(port), "--log-level", "WARNING"]
    argv.append("--disable-cache-status")  # as LMDeploy's here: nothing kept on disk
    argv += flags
    if workers > 1:
        argv += ["--workers", str(workers)]
    cpu = PROXY_CPU if workers == 1 else _worker_cpus(workers)
    proc = group.start(argv, cpu, cwd=checkout)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", status=503)  # up, no node yet
    register(url, nodes)
    wait_http(url + "/health")
    return proc.pid, url


def _worker_cpus(workers: int) -> str:
    """The cores N workers run on: N cores other than the load's when the machine has
    them, else every core (then the workers share one with wrk and the sims, and the
    sweep is no scaling measurement: the report says how many cores there were)."""
    cores = sorted(os.sched_getaffinity(0))
    free = [c for c in cores if str(c) != LOAD_CPU]
    chosen = free[:workers] if len(free) >= workers else cores
    return ",".join(map(str, chosen))


def start_floor(group: Procs, nodes: list[str]) -> tuple[int, str]:
    """bench/_floor_proxy.py: a floor for a Python proxy, nothing of lmfleet's."""
    port = free_port()
    proc = group.start([PY, str(ROOT / "bench" / "_floor_proxy.py"), str(port), *nodes], PROXY_CPU)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    return proc.pid, url


def start_smg(group: Procs, nodes: list[str]) -> tuple[int, str]:
    """SMG's HTTP router over the nodes, round robin (its fastest policy), all its
    threads pinned to the proxy's core as every proxy here is."""
    port = free_port()
    argv = [SMG, "launch", "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"]
    argv += ["--log-level", "error", "--worker-urls", *nodes]
    proc = group.start(argv, PROXY_CPU)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readiness", timeout=60)
    return proc.pid, url


def start_lmdeploy(group: Procs, nodes: list[str], strategy: str, uvloop: bool) -> tuple[int, str]:
    port = free_port()
    argv = [LMDEPLOY_PY, "-m", "lmdeploy", "serve", "proxy", "--server-name", "127.0.0.1"]
    argv += ["--server-port", str(port), "--routing-strategy", strategy, "--disable-cache-status"]
    argv += ["--log-level", "ERROR"]
    env = {"UVICORN_LOG_LEVEL": "warning"}  # no access log, as for lmfleet and nginx
    if uvloop:  # LMDeploy's deps do not bring uvloop/httptools; lend ours (same Python)
        env["PYTHONPATH"] = _uvloop_path()
    proc = group.start(argv, PROXY_CPU, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/nodes/status", timeout=120)
    status = get_json(url + "/nodes/status")  # nodes from a cached proxy_config.json?
    for stale in status if isinstance(status, dict) else ():
        if stale not in nodes:
            post_json(url + "/nodes/remove", {"url": stale})
    register(url, nodes)
    return proc.pid, url


def _uvloop_path() -> str:
    import httptools
    import uvloop

    path = Path(tempfile.mkdtemp(prefix="lmfleet-bench-uvloop-"))
    for module in (uvloop, httptools):
        src = Path(module.__file__ or "").parent
        (path / src.name).symlink_to(src)
    return str(path)


def start_nginx(group: Procs, nodes: list[str], workdir: str) -> tuple[int, str]:
    port = free_port()
    servers = " ".join(f"server {n.removeprefix('http://')};" for n in nodes)
    mask = format(1 << int(PROXY_CPU), "b")
    conf = Path(workdir) / "nginx.conf"
    conf.write_text(NGINX_CONF.format(mask=mask, dir=workdir, servers=servers, port=port))
    proc = group.start(["nginx", "-c", str(conf), "-p", workdir], PROXY_CPU)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    return proc.pid, url


async def _ttft(url: str, count: int) -> list[float]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello, how are you?"}],
        "max_tokens": 16,
        "stream": True,
    }
    out = []
    async with httpx2.AsyncClient(timeout=30) as client:
        for i in range(count + 10):
            start = time.perf_counter()
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
                first = None
                async for _ in resp.aiter_raw():
                    if first is None:
                        first = time.perf_counter() - start
            if i >= 10 and first is not None:  # 10 warm-up streams
                out.append(first * 1000)
    return out


def measure(name: str, pid: int | None, url: str, seconds: float, ttft_count: int) -> list[dict]:
    rows = []
    wrk(url, 32, 1, stream=False)  # warm-up: connections, caches
    for stream in (False, True):
        for conns in CONCURRENCY:
            cpu0 = cpu_seconds(pid) if pid else 0.0
            res = wrk(url, conns, seconds, stream=stream)
            cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
            row = {
                "proxy": name,
                "stream": stream,
                "connections": conns,
                "rps": res.rps,
                "p50_ms": res.p50_ms,
                "p99_ms": res.p99_ms,
                "errors": res.errors + res.non2xx,
                "requests": res.requests,
                "cpu_ms_per_req": 1000 * cpu / max(1, res.requests) if pid else None,
            }
            rows.append(row)
            mode = "stream" if stream else "plain "
            cpu_text = f"{row['cpu_ms_per_req']:.3f} ms CPU/req" if pid else ""
            print(
                f"  {name:16s} {mode} c={conns:<3d} {res.rps:8.0f} req/s  p50 {res.p50_ms:6.2f}"
                f"  p99 {res.p99_ms:6.2f} ms  errors {row['errors']}  {cpu_text}",
                flush=True,
            )
    ttft = asyncio.run(_ttft(url, ttft_count))
    rows.append(
        {
            "proxy": name,
            "ttft_p50_ms": statistics.median(ttft),
            "ttft_p99_ms": statistics.quantiles(ttft, n=100)[98],
        }
    )
    print(f"  {name:16s} TTFT p50 {rows[-1]['ttft_p50_ms']:.2f} ms", flush=True)
    return rows


def report(rows: list[dict]) -> str:
    direct = {
        (r["stream"], r["connections"]): r for r in rows if r["proxy"] == "direct" and "rps" in r
    }
    ttft = {r["proxy"]: r for r in rows if "ttft_p50_ms" in r}
    out = []
    for stream in (False, True):
        body = []
        for r in rows:
            if "rps" not in r or r["stream"] != stream:
                continue
            base = direct.get((stream, r["connections"]))
            added = "-"
            if base and r["proxy"] != "direct":
                added = f"{r['p50_ms'] - base['p50_ms']:+.2f}"
            cpu = f"{r['cpu_ms_per_req']:.3f}" if r["cpu_ms_per_req"] is not None else "-"
            body.append(
                [r["proxy"], r["connections"], f"{r['rps']:,.0f}", f"{r['p50_ms']:.2f}",
                 f"{r['p99_ms']:.2f}", added, cpu, r["errors"]]
            )  # fmt: skip
        title = "SSE streaming, 16 chunks" if stream else "non-streaming"
        heads = ["proxy", "conns", "req/s", "p50 ms", "p99 ms", "added p50 ms", "CPU ms/req"]
        out.append(f"{title}\n\n" + table([*heads, "errors"], body))
    base_ttft = ttft.get("direct", {}).get("ttft_p50_ms", 0.0)
    out.append("time to first SSE chunk, sequential streams\n\n" + table(
        ["proxy", "TTFT p50 ms", "TTFT p99 ms", "added p50 ms"],
        [[k, f"{v['ttft_p50_ms']:.2f}", f"{v['ttft_p99_ms']:.2f}",
          f"{v['ttft_p50_ms'] - base_ttft:+.2f}"] for k, v in ttft.items()],
    ))  # fmt: skip
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--ttft", type=int, default=200, help="sequential streams for TTFT")
    parser.add_argument(
        "--only",
        default="direct,lmfleet,smg,lmdeploy,lmdeploy+uvloop,nginx",
        help="comma list of: direct, lmfleet, lmfleet-pipeline (--no-fast-lane), lmfleet-wN "
        "(N workers: the --workers sweep, e.g. lmfleet-w2,lmfleet-w4), smg, lmdeploy, "
        "lmdeploy+uvloop, nginx, floor (a "
        "60-line uvloop proxy: what Python itself costs, bench/_floor_proxy.py)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "proxy.json")
    args = parser.parse_args()
    pin_self(LOAD_CPU)
    print(f"{machine()}; load average {load_average():.2f}", flush=True)
    rows: list[dict] = []
    with procs() as group, tempfile.TemporaryDirectory(prefix="lmfleet-bench-") as tmp:
        nodes = start_sims(group, 2, LOAD_CPU, "--fast", "--output-tokens", "16")
        for name in args.only.split(","):
            if name.startswith("lmdeploy") and not Path(LMDEPLOY_PY).exists():
                print(f"  skipping {name}: no {LMDEPLOY_PY} (make peer builds it)", flush=True)
                continue
            if name == "smg" and not Path(SMG).exists():
                print(f"  skipping smg: no {SMG} (make smg builds it)", flush=True)
                continue
            if name == "direct":
                rows += measure(name, None, nodes[0], args.seconds, args.ttft)
                continue
            if name == "lmfleet":
                pid, url = start_lmfleet(group, nodes)
            elif name == "lmfleet-pipeline":  # every request through the pipeline
                pid, url = start_lmfleet(group, nodes, 1, "--no-fast-lane")
            elif name.startswith("lmfleet-w"):  # the --workers sweep: lmfleet-w2, -w4, ...
                pid, url = start_lmfleet(group, nodes, workers=int(name.removeprefix("lmfleet-w")))
            elif name.startswith("lmdeploy"):
                pid, url = start_lmdeploy(
                    group, nodes, "min_expected_latency", uvloop=name.endswith("uvloop")
                )
            elif name == "nginx":
                pid, url = start_nginx(group, nodes, tmp)
            elif name == "smg":
                pid, url = start_smg(group, nodes)
            elif name == "floor":
                pid, url = start_floor(group, nodes)
            else:
                raise SystemExit(f"unknown proxy {name!r}")
            rows += measure(name, pid, url, args.seconds, args.ttft)
            group.stop_last()
    save_json(args.out, {"machine": machine(), "rows": rows})
    print()
    print(report(rows))


if __name__ == "__main__":
    main()
