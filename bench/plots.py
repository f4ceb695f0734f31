"""Plots for docs/benchmarks.md from bench/results/*.json (matplotlib, PNG).

.venv/bin/python -m bench.plots
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench._common import ROOT

RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"


def proxy_plot() -> None:
    data = json.loads((RESULTS / "proxy.json").read_text())
    rows = [r for r in data["rows"] if "rps" in r]
    proxies = list(dict.fromkeys(r["proxy"] for r in rows))
    conns = sorted({r["connections"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(proxies)
    for ax, stream in zip(axes[:2], (False, True), strict=True):
        for i, proxy in enumerate(proxies):
            values = [
                next((r["rps"] for r in rows if r["proxy"] == proxy and r["stream"] == stream
                      and r["connections"] == c), 0)
                for c in conns
            ]  # fmt: skip
            ax.bar([k + i * width for k in range(len(conns))], values, width, label=proxy)
        ax.set_xticks([k + width * (len(proxies) - 1) / 2 for k in range(len(conns))])
        ax.set_xticklabels([f"{c} conns" for c in conns])
        ax.set_ylabel("requests/s" if not stream else "streams/s")
        ax.set_title("SSE streaming, 16 chunks" if stream else "non-streaming")
        ax.grid(axis="y", alpha=0.3)
    ax = axes[2]
    measured = [p for p in proxies if p != "direct"]
    for i, stream in enumerate((False, True)):
        values = []
        for proxy in measured:
            cpu = [
                r["cpu_ms_per_req"] for r in rows if r["proxy"] == proxy and r["stream"] == stream
            ]
            values.append(sum(cpu) / len(cpu))
        ax.bar([k + i * 0.4 for k in range(len(measured))], values, 0.4,
               label="SSE" if stream else "non-streaming")  # fmt: skip
    ax.set_xticks([k + 0.2 for k in range(len(measured))])
    ax.set_xticklabels(measured, rotation=15)
    ax.set_ylabel("proxy CPU ms per request (mean over conns)")
    ax.set_title("proxy CPU per request (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    axes[0].legend(fontsize=8)
    fig.suptitle("Proxy overhead, proxy pinned to one core; 2 lmfleet sim --fast nodes")
    fig.tight_layout()
    fig.savefig(DOCS / "bench_proxy.png", dpi=110)


def routing_plot() -> None:
    data = json.loads((RESULTS / "routing.json").read_text())
    rows = data.get("single", [])
    routers = list(dict.fromkeys(r["router"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for key, ax, title in (("p99", axes[0], "p99 latency"), ("ttft_p99", axes[1], "p99 TTFT")):
        for router in routers:
            pts = sorted((r["load"], r[key]) for r in rows if r["router"] == router)
            style = "k--" if router == "ideal" else ("-o" if router.startswith("lmfleet") else ":s")
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], style, label=router)
        ax.set_xlabel("offered load, % of measured capacity")
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Routing quality: 4 simulated nodes, one 3x slower, Poisson arrivals")
    fig.tight_layout()
    fig.savefig(DOCS / "bench_routing.png", dpi=110)


def main() -> None:
    if (RESULTS / "proxy.json").exists():
        proxy_plot()
    if (RESULTS / "routing.json").exists():
        routing_plot()


if __name__ == "__main__":
    main()
