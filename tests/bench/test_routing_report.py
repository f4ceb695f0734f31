"""The routing-quality tables from a small synthetic results file."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.routing_quality import group_summary, parse_args, router_order
from bench.routing_report import report, versus


def _pcts(p99: float | None, scale: float = 1.0) -> dict[str, Any]:
    return {"p50": 1.0 * scale, "p90": 2.0 * scale, "p99": p99, "n": 1000.0, "censored": 0}


def _results(router_p99s: dict[str, list[float | None]]) -> dict[str, Any]:
    seeds = {}
    for k in range(3):
        base = {
            "lower_bound": {"all": {**_pcts(5.0), "ttft_p99": 0.1}},
            "rules": {
                "all": {
                    "least_work": {**_pcts(8.0), "ttft_p99": 0.2, "cache_hit": 0.0},
                    "jsq_speed": {**_pcts(11.0), "ttft_p99": 0.3, "cache_hit": 0.0},
                }
            },
            "best": {"all": "least_work"},
            "makespan": 100.0,
        }
        runs = {
            router: {"groups": {"all": _pcts(p99s[k])}, "errors": 0, "cache_hit": 0.0}
            for router, p99s in router_p99s.items()
        }
        runs["lmfleet:least_load"] = {"unavailable": "ConfigError: unknown"}
        seeds[str(k)] = {"baselines": base, "runs": runs}
    cell = {"load": 0.8, "concurrency": [], "groups": {}, "stream": False}
    return {
        "method": {"speeds": [1, 1, 0.333], "max_batch": 8, "scale": 1, "requests": 1000,
                   "seeds": [0, 1, 2], "machine": "test"},
        "cells": {"single80": {"cell": cell, "capacity": 11.1, "rate": 8.9, "seeds": seeds}},
    }  # fmt: skip


def _row(text: str, router: str, *, overview: bool = False) -> list[str]:
    """The router's row in the first cell's table (or in the overview above them)."""
    cells = text.index("\n### ")
    lines = (text[:cells] if overview else text[cells:]).splitlines()
    line = next(ln for ln in lines if ln.startswith(f"| {router} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_ratios_and_the_within_claim() -> None:
    text = report(
        _results(
            {
                "lmfleet:least_connections": [8.8, 8.8, 8.8],  # 1.10 on every seed
                "lmdeploy:random": [12.0, 16.0, 20.0],
                "oracle": [8.0, 8.0, 8.0],
            }
        )
    )
    good = _row(text, "lmfleet:least_connections")
    assert good[5] == "1.10 [1.10, 1.10]" and good[6] == "yes"
    assert good[7] == "0.80 [0.80, 0.80]" and good[8] == "yes"  # against ideal JSQ (11 s)
    assert good[9] == "1.10 [1.10, 1.10]"  # against the live oracle
    assert good[10] == "1.76 [1.76, 1.76]"  # against the lower bound (5 s)
    random_row = _row(text, "lmdeploy:random")
    assert random_row[6] == "no" and random_row[7] == "1.42 [1.09, 1.82]" and random_row[8] == "no"
    assert "not run: ConfigError: unknown" in text
    assert "reference (replay: least_work)" in text
    assert _row(text, "lmfleet:least_connections", overview=True)[1] == "1.10 [1.10, 1.10]"
    jsq_overview = text[text.index("p99 / ideal JSQ (") :]
    assert "| lmfleet:least_connections | 0.80 [0.80, 0.80] |" in jsq_overview


def test_an_overloaded_router_is_unbounded_not_a_number() -> None:
    text = report(_results({"lmfleet:random": [None, 30.0, 31.0]}))
    row = _row(text, "lmfleet:random")
    assert row[5] == "overloaded on 1/3 seeds" and row[6] == "no"
    assert _row(text, "lmfleet:random", overview=True)[1] == "over 1/3 seeds"


def test_group_summary_counts_censored_requests_as_unbounded() -> None:
    records = [{"c": 0, "ok": True, "censored": False, "latency": 1.0, "ttft": None}] * 98
    records += [{"c": 0, "ok": False, "censored": True, "latency": None, "ttft": None}] * 2
    got = group_summary(records, None)
    assert got["p50"] == 1.0 and got["p99"] is None and got["censored"] == 2
    assert not any(isinstance(v, float) and math.isinf(v) for v in got.values())


def test_router_order_rotates_with_the_seed() -> None:
    routers = ["a", "b", "c"]
    assert [router_order(routers, s)[0] for s in range(4)] == ["a", "b", "c", "a"]


def test_versus_pairs_every_percentile_with_the_baseline() -> None:
    results = _results(
        {"lmfleet:least_connections": [8.8, 8.8, 8.8], "lmdeploy:random": [12.0, 16.0, 20.0]}
    )
    lines = versus(results, "lmdeploy:random").splitlines()
    row = next(ln for ln in lines if ln.startswith("| lmfleet:least_connections |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == ["single80", "1.00 [1.00, 1.00]", "1.00 [1.00, 1.00]", "0.56 [0.44, 0.73]"]
    slower = versus(results, "lmfleet:least_connections").splitlines()
    row = next(ln for ln in slower if ln.startswith("| lmdeploy:random |"))
    assert row.endswith("| 1.78 [1.36, 2.27] (worse) |")


def test_versus_refuses_a_baseline_without_runs_and_a_missing_table() -> None:
    results = _results({"lmfleet:least_connections": [8.8, 8.8, 8.8]})
    with pytest.raises(ValueError, match="lmdeploy:typo"):
        versus(results, "lmdeploy:typo")
    with pytest.raises(SystemExit):
        parse_args(["--versus", "lmdeploy:min_expected_latency"])
    assert parse_args(["--table", "--versus", "x"]).versus == "x"
