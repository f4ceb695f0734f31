"""bench/batch_auto.py in small: every setting answers every prompt, and the
interactive user beside it is measured."""

from __future__ import annotations

import pytest

from bench.batch_auto import run_all

pytestmark = pytest.mark.xdist_group("batch_auto_bench")


def test_a_small_run_answers_everything_beside_an_interactive_user() -> None:
    runs = run_all(seeds=1, prompts=60, settings=["8", "auto"])
    assert [r.setting for r in runs] == ["8", "auto"]
    for run in runs:
        assert run.seconds > 0 and run.interactive_count >= 1
        assert 0 < run.interactive_p50 <= run.interactive_p99
