"""bench/routing_quality.py: the results file only ever grows under --resume."""

from __future__ import annotations

from bench.routing_quality import make_setup, offline, parse_args


def test_resume_keeps_the_cells_not_run_now_and_the_runs_of_those_run() -> None:
    setup = make_setup(parse_args(["--seeds", "1", "--requests", "20", "--scale", "8"]))
    other = {"cell": {"name": "multi80"}, "seeds": {"0": {"runs": {"x": {"groups": {}}}}}}
    done = {"lmfleet:least_load": {"groups": {"all": {"p99": 1.0}}}}
    previous = {
        "method": setup.method(),
        "cells": {"multi80": other, "single80": {"seeds": {"0": {"runs": done}}}},
    }
    results, _ = offline(setup, ["single80"], previous)
    assert results["cells"]["multi80"] == other
    assert results["cells"]["single80"]["seeds"]["0"]["runs"] == done
    assert "baselines" in results["cells"]["single80"]["seeds"]["0"]
