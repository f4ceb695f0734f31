"""Fault injection: what a test can make a node do wrong, from flags or `POST /sim/faults`.

One mutable object per app (tests change it while the node runs). Each field is
checked at one place in the request path, so a fault costs nothing when unset.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lmfleet.sim.options import SimOptions

_HEALTH_FAULTS = (None, "unhealthy", "initializing")


@dataclass
class Faults:
    """The live fault settings of one node."""

    error_rate: float = 0.0
    error_status: int = 500
    hang: bool = False
    hang_after_head: bool = False
    hang_health: bool = False
    models_delay: float = 0.0
    """Seconds `/v1/models` takes to answer (a node slow to list its models, as a
    loaded one is: the fleet's probe of it stays in flight that long)."""
    crash_after: int | None = None
    drop_stream_after: int | None = None
    stall_stream_after: int | None = None
    health: str | None = None
    # /update_weights (and /update_weights_from_distributed) answer this status.
    update_weights_error: int | None = None
    # /wakeup answers this status and the node stays asleep (a GPU that cannot take
    # the weights back, say): set through POST /sim/faults.
    wakeup_error: int | None = None
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    @classmethod
    def from_options(cls, options: SimOptions) -> Faults:
        return cls(
            error_rate=options.error_rate,
            error_status=options.error_status,
            hang=options.hang,
            hang_after_head=options.hang_after_head,
            hang_health=options.hang_health,
            crash_after=options.crash_after,
            drop_stream_after=options.drop_stream_after,
            stall_stream_after=options.stall_stream_after,
            health=options.health_fault,
            update_weights_error=options.update_weights_error,
            rng=random.Random(options.seed),
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("rng")
        return data

    def update(self, changes: Any) -> None:
        """Apply a JSON object of changes; ValueError names the first bad field."""
        if not isinstance(changes, dict):
            raise ValueError("body must be a JSON object")
        allowed = {f.name for f in fields(self)} - {"rng"}
        for key, value in changes.items():
            if key not in allowed:
                raise ValueError(f"unknown fault {key!r}; known: {sorted(allowed)}")
            _check(key, value)
        for key, value in changes.items():
            setattr(self, key, value)

    def should_fail(self) -> bool:
        """Draw one injected error (seeded, so a run is reproducible)."""
        return self.error_rate > 0 and self.rng.random() < self.error_rate


def _check(key: str, value: Any) -> None:
    ok: bool
    if key == "error_rate":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    elif key == "error_status":
        ok = isinstance(value, int) and 400 <= value <= 599
    elif key in ("hang", "hang_after_head", "hang_health"):
        ok = isinstance(value, bool)
    elif key == "models_delay":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 60
    elif key in ("update_weights_error", "wakeup_error"):
        ok = value is None or (
            isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599
        )
    elif key in ("crash_after", "drop_stream_after", "stall_stream_after"):
        ok = value is None or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        )
    else:  # health
        ok = value in _HEALTH_FAULTS
    if not ok:
        raise ValueError(f"invalid value for {key!r}: {value!r}")
