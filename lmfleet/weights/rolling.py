"""The one-call update (`fleet.update_weights`): which nodes go together, and the
combined result. All at once is an RL sync step: every node leaves routing, takes
the weights, comes back. `rolling=k` takes k nodes at a time while the others
serve: a mixed-version window the caller asked for, so mixing is allowed unless
they say otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmfleet.errors import ConfigError
from lmfleet.weights.session import UpdateResult


def groups(urls: Sequence[str], rolling: bool | int) -> list[list[str]]:
    """`urls` in the groups updated one after another (one group when not rolling)."""
    if rolling is False:
        return [list(urls)]
    size = 1 if rolling is True else rolling
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"rolling must be False or a number of nodes >= 1, got {rolling!r}")
    return [list(urls[i : i + size]) for i in range(0, len(urls), size)]


def combine(version: int, results: Sequence[UpdateResult]) -> UpdateResult:
    """One result for the groups of a rolling update."""
    updated = tuple(url for r in results for url in r.updated)
    failed = {url: why for r in results for url, why in r.failed.items()}
    return UpdateResult(version, updated, failed, sum(r.seconds for r in results))
