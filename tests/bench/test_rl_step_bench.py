"""bench/rl_step.py in small: every mode ends with every rollout whole, and with
`in_flight="continue"` no token is generated twice (the nodes' own counters)."""

from __future__ import annotations

import pytest

from bench.rl_step import lengths, run_mode

pytestmark = pytest.mark.xdist_group("rl_step_bench")


@pytest.mark.parametrize("mode", ["continue", "abort"])
def test_a_small_step_finishes_every_rollout(mode: str) -> None:
    (step,) = run_mode(mode, seeds=1, rollouts=12)
    assert step.useful_tokens == sum(lengths(0, 12))
    if mode == "continue":
        assert step.twice == 0 and step.resubmitted == 0
    else:
        assert step.twice >= 0 and step.prefilled_again == 0
