"""The weight-update bench's core at tiny scale: every cell runs, every node updates,
and the result has the shape the report and docs/benchmarks.md read. No timing is
asserted (speed is recorded in docs/benchmarks.md, never tested)."""

from __future__ import annotations

from dataclasses import replace

from bench.weight_update import QUICK, markdown_section, run_bench

TINY = replace(
    QUICK,
    nodes=2,
    concurrency=2,
    window=0.5,
    warmup=0.2,
    seconds_per_gb=0.001,
    modes=("all", "rolling1"),
)


def test_quick_core_runs_every_cell_and_reports_its_structure() -> None:
    results = run_bench(TINY)
    configs = results["configs"]
    assert [(c["load"], c["mode"]) for c in configs] == [
        ("idle", "all"),
        ("idle", "rolling1"),
        ("load", "all"),
        ("load", "rolling1"),
    ]
    for config in configs:
        assert len(config["reps"]) == TINY.reps
        for rep in config["reps"]:
            cycle = rep["cycle"]
            assert cycle["updated"] == TINY.nodes and cycle["failed"] == {}
            assert len(cycle["groups"]) == (1 if config["mode"] == "all" else TINY.nodes)
            assert {"seconds", "enter_s", "push_s", "exit_s", "result_seconds"} <= set(cycle)
    loaded = [c for c in configs if c["load"] == "load"]
    for config in loaded:
        assert config["requests"] > 0
        for rep in config["reps"]:
            assert {"baseline", "update", "overlap", "baseline_overlap", "versions"} <= set(rep)
            assert {"rps", "tps", "completed", "failed"} <= set(rep["update"])
            assert {"p50_ms", "p99_ms", "latencies_ms"} <= set(rep["overlap"])
    rolling = next(c for c in loaded if c["mode"] == "rolling1")
    assert all(rep["failed"] == 0 for rep in rolling["reps"])  # rolling never drops a request
    # The last version is on every node: each cycle moved the whole fleet forward.
    assert len(configs[-1]["versions_end"]) == 1
    section = markdown_section(
        {**results, "argv": "--quick", "machine": "test", "out": "weight_update.json"}
    )
    assert "| rolling=1 | load |" in section
