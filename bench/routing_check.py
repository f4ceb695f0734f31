"""Replay check: one live `lmfleet sim` node against the noise-free replay.

    .venv/bin/python -m bench.routing_quality --check-replay [--scale K]

Why: the reference and the lower bound come from the replay, so the replay must
compute what the simulator does. A single node leaves routing out of it; a batch
of 2 makes requests queue and share the batch (slowdown), so admission, prefill,
per-step pacing and release are all exercised.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from typing import Any

from bench._common import procs
from bench.routing_live import (
    ClientSpec,
    ScheduleSpec,
    node_stats,
    reset_nodes,
    run_in_process,
    start_nodes,
    wait_drained,
)
from bench.routing_replay import RULES, NodeModel, replay
from bench.routing_workload import Schedule, run_salt

CHECK_OUTPUTS = (5, 40, 12, 30, 8, 25, 3, 18, 35, 10)
CHECK_OVERHEADS_MS = tuple(x / 10 for x in range(31))  # 0.0 .. 3.0 ms per sleep


def check_replay(scale: float, coarsen: int = 1) -> dict[str, Any]:
    """A live single node (speed 0.5, max batch 2) vs the replay, on 10 short requests.

    The batch of 2 makes requests queue and share the batch. Sent twice on the same
    node, streamed (TTFT checked too) then not, each with its own prompt salt, after
    one warm-up request. Also fits the per-sleep overhead (`sleep_overhead_ms`) that
    makes the replay match the live node best: the live event loop's timer overshoot.
    """
    model = NodeModel(speed=0.5, max_batch=2).scaled(scale).coarsened(coarsen)
    recipe = ScheduleSpec("chat", 7, len(CHECK_OUTPUTS), rate=3.0 * scale, outputs=CHECK_OUTPUTS)
    sched = recipe.build()
    out: dict[str, Any] = {"scale": scale, "node": asdict(model)}
    with procs() as group:
        urls = start_nodes(group, [model])
        sender = {"kind": "urls", "urls": urls}
        warm = ScheduleSpec("chat", 8, 1, rate=1.0, outputs=(2,))
        run_in_process(ClientSpec(warm, None, run_salt(0, 0), False, sender))
        for run, stream in enumerate((True, False), start=1):
            reset_nodes(urls)
            records = run_in_process(ClientSpec(recipe, None, run_salt(0, run), stream, sender))
            wait_drained(urls)
            tokens = node_stats(urls)[0]["completion_tokens"]
            live = {r["i"]: r for r in records}
            out["stream" if stream else "plain"] = _compare(sched, model, live, tokens)
    return out


def _compare(
    sched: Schedule, model: NodeModel, live: dict[int, dict[str, Any]], tokens: int
) -> dict[str, Any]:
    """Per-request live vs replayed latency (and TTFT), plus the best-fitting overhead."""
    exact = replay(sched, [model], RULES["jsq_count"])
    rows = [
        {
            "i": i,
            "output": r.output_tokens,
            "latency_live": live[i]["latency"],
            "latency_replay": exact.latency[i],
            "ttft_live": live[i]["ttft"],
            "ttft_replay": exact.ttft[i],
        }
        for i, r in enumerate(sched.requests)
    ]
    gaps = [row["latency_live"] - row["latency_replay"] for row in rows]
    rel = [row["latency_live"] / row["latency_replay"] for row in rows]

    def error(overhead_ms: float) -> float:
        fitted = replay(sched, [replace(model, sleep_overhead_ms=overhead_ms)], RULES["jsq_count"])
        return math.fsum((live[i]["latency"] - fitted.latency[i]) ** 2 for i in live)

    best = min(CHECK_OVERHEADS_MS, key=error)
    fitted = replay(sched, [replace(model, sleep_overhead_ms=best)], RULES["jsq_count"])
    fit_gaps = [live[i]["latency"] - fitted.latency[i] for i in live]
    return {
        "latency_gap_ms": [1000 * min(gaps), 1000 * max(gaps)],
        "latency_ratio": [min(rel), max(rel)],
        "fitted_overhead_ms": best,
        "fitted_gap_ms": [1000 * min(fit_gaps), 1000 * max(fit_gaps)],
        "tokens": tokens,
        "tokens_expected": sum(r.output_tokens for r in sched.requests),
        "rows": rows,
    }
