"""Client-side load balancing: which node gets the next request.

Each strategy is a small pure chooser in its own module (see `base.Strategy`),
declaring what it needs on `base.BaseStrategy`. `resolve_strategy` turns a name from
options, the CLI or LMDeploy's `--routing-strategy` into one, and adapts a user's
own object that has only `pick`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from types import MappingProxyType

from lmfleet.plain_errors import ConfigError
from lmfleet.routing.affinity import affinity_key
from lmfleet.routing.base import (
    CAPABILITIES,
    BaseStrategy,
    Candidate,
    Decision,
    PlainStrategy,
    RequestInfo,
    Strategy,
    as_base_strategy,
    explain_pick,
    uses_node_load,
    wants_affinity_key,
)
from lmfleet.routing.least_connections import LeastConnections
from lmfleet.routing.least_load import LeastLoad
from lmfleet.routing.min_expected_latency import MinExpectedLatency
from lmfleet.routing.min_observed_latency import MinObservedLatency
from lmfleet.routing.power_of_two import PowerOfTwo
from lmfleet.routing.prefix_affinity import PrefixAffinity
from lmfleet.routing.random_choice import RandomStrategy
from lmfleet.routing.round_robin import RoundRobin

__all__ = [
    "CAPABILITIES",
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "BaseStrategy",
    "Candidate",
    "Decision",
    "LeastConnections",
    "LeastLoad",
    "MinExpectedLatency",
    "MinObservedLatency",
    "PlainStrategy",
    "PowerOfTwo",
    "PrefixAffinity",
    "RandomStrategy",
    "RequestInfo",
    "RoundRobin",
    "Strategy",
    "affinity_key",
    "as_base_strategy",
    "explain_pick",
    "resolve_strategy",
    "uses_node_load",
    "wants_affinity_key",
]

DEFAULT_STRATEGY = "least_load"
"""What `attach`, `simulate`, `launch` and `lmfleet serve` route with unless told:
chosen by measurement (docs/benchmarks.md §3; it was `least_connections` before)."""

StrategyFactory = Callable[[random.Random | None], BaseStrategy]


def _factory(cls: Callable[..., BaseStrategy]) -> StrategyFactory:
    return lambda rng: cls(rng=rng)


STRATEGIES: Mapping[str, StrategyFactory] = MappingProxyType(
    {
        cls.name: _factory(cls)
        for cls in (
            RandomStrategy,
            RoundRobin,
            LeastConnections,
            LeastLoad,
            MinObservedLatency,
            MinExpectedLatency,
            PowerOfTwo,
            PrefixAffinity,
        )
    }
)
"""Canonical name -> factory taking an optional RNG. LMDeploy's three names
(`random`, `min_expected_latency`, `min_observed_latency`) are canonical too."""


def _canonical(name: str) -> str:
    """`Round-Robin`, `ROUND_ROBIN`, `RoutingStrategy.MIN_EXPECTED_LATENCY` -> snake case."""
    text = name.strip().lower().replace("-", "_").replace(" ", "_")
    return text.removeprefix("routingstrategy.")


def resolve_strategy(spec: str | Strategy, *, rng: random.Random | None = None) -> BaseStrategy:
    """A strategy from its name, or from `spec` itself when it already has a `pick`.

    Names are case-insensitive and accept hyphens, and LMDeploy's
    `RoutingStrategy` enum spellings. Unknown names raise `ConfigError`. A
    `BaseStrategy` is returned as it is; any other object with `pick` is adapted
    (`PlainStrategy`, its own object at `.wrapped`), and one that declares a
    capability that does not exist (`uses_node_lod`) raises `ConfigError`.
    """
    if isinstance(spec, str):
        factory = STRATEGIES.get(_canonical(spec))
        if factory is None:
            valid = ", ".join(sorted(STRATEGIES))
            raise ConfigError(f"unknown routing strategy {spec!r}; valid names: {valid}")
        return factory(rng)
    if callable(getattr(spec, "pick", None)):
        try:
            return as_base_strategy(spec)
        except TypeError as exc:
            raise ConfigError(f"routing strategy {spec!r}: {exc}") from exc
    raise ConfigError(
        f"routing strategy must be a name or an object with a pick() method, got {spec!r}"
    )
