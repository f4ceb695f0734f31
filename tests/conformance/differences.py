"""Every accepted difference between `lmfleet sim` and the real LMDeploy 0.18.0.

The ONE place where the conformance suite tolerates a mismatch; each entry says
why. docs/conformance.md mirrors this table. A difference not listed here fails
the suite: fix the simulator (or lmfleet) instead of adding a line, unless the
difference comes from the stub engine or cannot matter to a router.

Keys are `case:path` globs (fnmatch) over what `shape_diff` and the tests report:
`case` is the test case's name, `path` the JSON path (`$.choices[].x`) or one of
`status`, `content-type`, `message`.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

ACCEPTED: dict[str, str] = {
    # /pooling needs a reward model (InternLM2ForRewardModel, Qwen2ForRewardModel).
    # The peer's tiny Llama is not one, so LMDeploy answers 500 (plain text); the
    # simulator emulates a reward model and answers the PoolingResponse shape.
    "pooling:*": "the peer's stub model is not a reward model (LMDeploy: 500)",
}


def accepted(case: str, difference: str) -> str | None:
    """The reason `difference` (a `path: what` line) is accepted for `case`, or None."""
    path = difference.split(":", 1)[0]
    for pattern, reason in ACCEPTED.items():
        if fnmatchcase(f"{case}:{path}", pattern):
            return reason
    return None


def unexplained(case: str, differences: list[str]) -> list[str]:
    return [d for d in differences if accepted(case, d) is None]
