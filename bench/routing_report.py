"""Markdown tables of the routing-quality results (bench/results/routing_quality.json).

Pure: reads the results dict, computes the paired ratios with their bootstrap
intervals (bench/routing_stats.py), and formats one table per cell and client
group, for docs/benchmarks.md. Columns:

- p50/p90/p99: medians over seeds of the per-seed percentiles (seconds);
- p99 / reference: the router's p99 over the replayed reference's p99, paired by
  seed; geometric mean [bootstrap 95 % interval]; "within 15 %" only if the
  interval's upper end is below 1.15;
- p99 / ideal JSQ: the same against the replayed speed-weighted join-shortest-queue
  (`jsq_speed`: exact node states, no noise, no output lengths; the "ideal JSQ" of
  issue 15's goal), and whether it is within 15 % by the same rule;
- p99 / oracle: the same against the oracle run live (the reference's assignment
  sent through the same harness), which cancels the harness's own overhead;
- p99 / lower bound: against the per-request bound (how much room there is at all);
- errors: failed requests; cut: requests still running at the run's deadline
  (counted as unbounded latency: an overloaded router's percentiles are unbounded).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from bench._common import table
from bench.routing_stats import Interval, bootstrap_ratio, within, worse

ORACLE = "oracle"
IDEAL_JSQ = "jsq_speed"
"""The replayed rule that is "ideal JSQ": (requests on the node + 1) / speed, exact."""


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def done_runs(cell_out: dict[str, Any], router: str) -> dict[str, dict[str, Any]]:
    """seed -> run, for the seeds where `router` completed a run."""
    return {
        seed: data["runs"][router]
        for seed, data in cell_out["seeds"].items()
        if "groups" in data.get("runs", {}).get(router, {})
    }


def reference(cell_out: dict[str, Any], seed: str, group: str) -> dict[str, float]:
    """The replayed reference's percentiles (its best rule) for one seed and group."""
    base = cell_out["seeds"][seed]["baselines"]
    return base["rules"][group][base["best"][group]]


def ideal_jsq(cell_out: dict[str, Any], seed: str, group: str) -> dict[str, float] | None:
    """The replayed ideal JSQ's percentiles for one seed and group (None: not replayed)."""
    rules: dict[str, dict[str, float]] = cell_out["seeds"][seed]["baselines"]["rules"][group]
    return rules.get(IDEAL_JSQ)


def bound(cell_out: dict[str, Any], seed: str, group: str) -> dict[str, float]:
    return cell_out["seeds"][seed]["baselines"]["lower_bound"][group]


def ratio(
    mine: Mapping[str, Mapping[str, Any]],
    theirs: Mapping[str, Mapping[str, float] | None],
    key: str = "p99",
) -> Interval | str | None:
    """Paired ratio over the seeds both have (None if they share none).

    A seed where the router's percentile is unbounded (None: censored requests at
    the run's deadline) makes the ratio unbounded too: "overloaded on k/n seeds".
    """
    seeds = sorted(s for s in set(mine) & set(theirs) if theirs[s] is not None)
    if not seeds:
        return None
    paired = {s: (mine[s][key], theirs[s][key]) for s in seeds}  # type: ignore[index]
    over = [s for s, (a, b) in paired.items() if a is None or b is None]
    if over:
        return f"overloaded on {len(over)}/{len(seeds)} seeds"
    return bootstrap_ratio([a for a, _ in paired.values()], [b for _, b in paired.values()])


def _within(got: Interval | str | None) -> str:
    return "yes" if isinstance(got, Interval) and within(got) else "no"


def _seconds(values: Sequence[float | None]) -> str:
    """Median over seeds; None (unbounded) counts as +inf."""
    mid = median([math.inf if v is None else v for v in values])
    return "unbounded" if math.isinf(mid) else f"{mid:.2f}"


def router_row(cell_out: dict[str, Any], router: str, group: str, stream: bool) -> list[str]:
    """One router's row; `router` must have at least one completed run."""
    runs = done_runs(cell_out, router)
    mine = {s: r["groups"][group] for s, r in runs.items()}
    ref = {s: reference(cell_out, s, group) for s in runs}
    low = {s: bound(cell_out, s, group) for s in runs}
    oracle = {s: r["groups"][group] for s, r in done_runs(cell_out, ORACLE).items()}
    vs_ref = ratio(mine, ref)
    vs_jsq = ratio(mine, {s: ideal_jsq(cell_out, s, group) for s in runs})
    row: list[Any] = [router, len(runs)]
    row += [_seconds([m[k] for m in mine.values()]) for k in ("p50", "p90", "p99")]
    row += [vs_ref, _within(vs_ref), vs_jsq, "-" if vs_jsq is None else _within(vs_jsq)]
    row += [ratio(mine, oracle) if router != ORACLE else "1", ratio(mine, low)]
    row += [ratio(mine, ref, "p90"), sum(r["errors"] for r in runs.values())]
    row += [sum(m.get("censored", 0) for m in mine.values())]
    if stream:
        ttft = [m["ttft_p99"] for m in mine.values() if m.get("ttft_p99") is not None]
        row += [f"{median(ttft):.3f}", f"{median([r['cache_hit'] for r in runs.values()]):.0%}"]
    return [("-" if cell is None else str(cell)) for cell in row]


def baseline_rows(cell_out: dict[str, Any], group: str, stream: bool) -> list[list[str]]:
    """The replayed reference and the lower bound, as rows of the same table."""
    seeds = list(cell_out["seeds"])
    ref = [reference(cell_out, s, group) for s in seeds]
    low = [bound(cell_out, s, group) for s in seeds]
    jsq = [j for j in (ideal_jsq(cell_out, s, group) for s in seeds) if j is not None]
    rules = sorted({cell_out["seeds"][s]["baselines"]["best"][group] for s in seeds})
    named = [(f"reference (replay: {', '.join(rules)})", ref)]
    named += [(f"ideal JSQ (replay: {IDEAL_JSQ})", jsq)] if jsq else []
    rows = []
    for name, values in [*named, ("lower bound", low)]:
        row = [name, str(len(values))]
        row += [f"{median([v[k] for v in values]):.2f}" for k in ("p50", "p90", "p99")]
        row += ["1" if values is ref else "-", "", "1" if values is jsq else "-", ""]
        row += ["-", "-", "-", "0", "0"]
        if stream:
            row.append(f"{median([v['ttft_p99'] for v in values]):.3f}")
            row.append(
                f"{median([v['cache_hit'] for v in values]):.0%}" if values is not low else "-"
            )
        rows.append(row)
    return rows


def cell_table(cell_out: dict[str, Any], group: str) -> str:
    """Every router of one cell and client group, best p99 ratio first, then the baselines."""
    stream = cell_out["cell"]["stream"]
    heads = ["router", "seeds", "p50 s", "p90 s", "p99 s", "p99 / reference", "within 15 %"]
    heads += [
        "p99 / ideal JSQ",
        "within 15 % of JSQ",
        "p99 / oracle (live)",
        "p99 / lower bound",
        "p90 / reference",
        "errors",
        "cut",
    ]
    if stream:
        heads += ["TTFT p99 s", "cache hit"]
    ranked, missing = [], []
    routers = sorted({r for d in cell_out["seeds"].values() for r in d.get("runs", {})})
    for router in routers:
        if done_runs(cell_out, router):
            row = router_row(cell_out, router, group, stream)
            ranked.append((_point(row[5]), row))
        else:
            missing.append([router, "0", f"not run: {why_not(cell_out, router)}"])
    ranked.sort(key=lambda item: item[0])
    body = [row for _, row in ranked] + baseline_rows(cell_out, group, stream)
    body += [row + [""] * (len(heads) - len(row)) for row in missing]
    return table(heads, body)


def _point(text: str) -> float:
    """The point estimate of a formatted interval (for sorting)."""
    try:
        return float(text.split()[0])
    except (ValueError, IndexError):
        return math.inf


def why_not(cell_out: dict[str, Any], router: str) -> str:
    for data in cell_out["seeds"].values():
        run = data.get("runs", {}).get(router, {})
        reason = run.get("unavailable") or run.get("failed")
        if reason:
            return str(reason)
    return "no run"


def overview(results: dict[str, Any], against: str = "reference") -> str:
    """One row per router, one column per cell (and client group): p99 / reference
    (or, `against="ideal JSQ"`, p99 / the replayed ideal JSQ)."""
    columns = [
        (name, group)
        for name, cell_out in results["cells"].items()
        for group in ["all", *cell_out["cell"]["groups"]]
    ]
    routers = sorted(
        {r for c in results["cells"].values() for d in c["seeds"].values() for r in d["runs"]}
    )
    base = reference if against == "reference" else ideal_jsq
    body = []
    for router in routers:
        row = [router]
        for name, group in columns:
            cell_out = results["cells"][name]
            runs = done_runs(cell_out, router)
            mine = {s: r["groups"][group] for s, r in runs.items() if group in r["groups"]}
            got = ratio(mine, {s: base(cell_out, s, group) for s in mine})
            row.append("-" if got is None else str(got).replace("overloaded on ", "over "))
        body.append(row)
    heads = ["router", *(n if g == "all" else f"{n} ({g})" for n, g in columns)]
    return table(heads, body)


def versus(results: dict[str, Any], baseline: str) -> str:
    """Every other router against `baseline` at p50, p90 and p99, one row per router
    and cell: the paired per-seed ratio [bootstrap interval], marked "(worse)" when
    the whole interval is above 1 (`routing_stats.worse`); `ValueError` when no cell
    has a run of `baseline` (a misspelt router would give an empty table)."""
    if not any(done_runs(cell_out, baseline) for cell_out in results["cells"].values()):
        raise ValueError(f"no run of {baseline!r} in these results")
    body = []
    for name, cell_out in results["cells"].items():
        theirs = {s: r["groups"]["all"] for s, r in done_runs(cell_out, baseline).items()}
        routers = sorted({r for d in cell_out["seeds"].values() for r in d["runs"]} - {baseline})
        for router in routers:
            mine = {s: r["groups"]["all"] for s, r in done_runs(cell_out, router).items()}
            if not set(mine) & set(theirs):
                continue
            row = [router, name]
            for key in ("p50", "p90", "p99"):
                got = ratio(mine, theirs, key)
                mark = " (worse)" if isinstance(got, Interval) and worse(got) else ""
                row.append(f"{got}{mark}")
            body.append(row)
    return table(["router", "cell", "p50 / base", "p90 / base", "p99 / base"], body)


def report(results: dict[str, Any]) -> str:
    """The method line, then one table per cell (and per client group where it has them)."""
    m = results["method"]
    lines = [
        f"Nodes: speeds {m['speeds']}, max batch {m['max_batch']}, cost-model times / "
        f"{m['scale']:g}; {m['requests']} requests x {len(m['seeds'])} seeds per cell; "
        f"{m['machine']}.",
        "Ratios: geometric mean over seeds of the per-seed ratio [bootstrap 95 % interval]; "
        "p50/p90/p99: medians over seeds.",
        "",
        "p99 / reference, every cell:",
        "",
        overview(results),
        "",
        "p99 / ideal JSQ (the replayed `jsq_speed` rule), every cell:",
        "",
        overview(results, "ideal JSQ"),
    ]
    for name, cell_out in results["cells"].items():
        cell = cell_out["cell"]
        if cell_out["rate"]:
            load = (
                f"{cell_out['rate']:.1f} req/s = {cell['load']:.0%} of {cell_out['capacity']:.1f}"
            )
        else:
            load = f"closed loop, in flight {tuple(cell['concurrency'])}"
        for group in ["all", *cell["groups"]]:
            title = f"### {name}" + ("" if group == "all" else f", {group} client")
            lines += ["", f"{title} ({load})", "", cell_table(cell_out, group)]
    return "\n".join(lines)
