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
    """p99 / replayed reference per router and cell, with the bootstrap 95 % interval."""
    from bench.routing_report import ORACLE, done_runs, ratio, reference
    from bench.routing_stats import Interval

    data = json.loads((RESULTS / "routing_quality.json").read_text())
    cells = data["cells"]
    fig, axes = plt.subplots(1, len(cells), figsize=(3.2 * len(cells), 5.5), sharey=True)
    routers = sorted({r for c in cells.values() for d in c["seeds"].values() for r in d["runs"]})
    for ax, (name, cell_out) in zip(axes if len(cells) > 1 else [axes], cells.items(), strict=True):
        for y, router in enumerate(routers):
            runs = done_runs(cell_out, router)
            mine = {s: r["groups"]["all"] for s, r in runs.items()}
            got = ratio(mine, {s: reference(cell_out, s, "all") for s in runs})
            if not isinstance(got, Interval):
                continue
            color = "k" if router == ORACLE else ("C0" if router.startswith("lmfleet") else "C3")
            err = [[got.point - got.low], [got.high - got.point]]
            ax.errorbar(got.point, y, xerr=err, fmt="o", color=color, capsize=3)
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.axvline(1.15, color="grey", lw=0.8, ls="--")
        ax.set_xlim(left=0.9)
        ax.set_title(name)
        ax.set_xlabel("p99 / reference")
        ax.grid(axis="x", alpha=0.3)
    first = axes[0] if len(cells) > 1 else axes
    first.set_yticks(range(len(routers)))
    first.set_yticklabels(routers, fontsize=8)
    fig.suptitle("Routing quality: p99 over the replayed reference (95 % interval over seeds)")
    fig.tight_layout()
    fig.savefig(DOCS / "bench_routing.png", dpi=110)


def main() -> None:
    if (RESULTS / "proxy.json").exists():
        proxy_plot()
    if (RESULTS / "routing_quality.json").exists():
        routing_plot()


if __name__ == "__main__":
    main()
