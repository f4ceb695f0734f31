"""lmfleet: run and load-balance a fleet of LMDeploy api_server nodes from Python.

The names below are imported when first used (PEP 562), not when `lmfleet` is: a
process that needs one corner of the package (a simulated node, option parsing)
does not pay for the rest (the fleet, and openai: lmfleet/plain_errors.py). The
simulator's modules import in 0.5 s instead of 1.6 (`python -X importtime`, 2-core
VM); the test suite starts hundreds of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmfleet.config import (
        FleetOptions,
        HealthOptions,
        NodeOptions,
        OutlierOptions,
        RoutingOptions,
    )
    from lmfleet.errors import (
        BatchError,
        ConfigError,
        EngineCapabilityError,
        EventLoopError,
        FleetBusyError,
        FleetClosedError,
        JournalMismatchError,
        LaunchError,
        LMFleetError,
        MigrationError,
        NodeCommandError,
        NodeUnavailableError,
        NoHealthyNodeError,
        NotReadyError,
        RecordedItemError,
        RoutingError,
        StreamInterruptedError,
        UnfinishedItemError,
        UnknownNodeError,
        UnknownObjectError,
        UnknownRequestError,
        WeightUpdateError,
        WeightUpdateUnsupportedError,
    )
    from lmfleet.fleet import LMFleet
    from lmfleet.jobs.journal import Journal
    from lmfleet.jobs.results import (
        BatchResult,
        ItemError,
    )
    from lmfleet.node.load import NodeLoad
    from lmfleet.node.state import (
        NodeRole,
        NodeState,
        NodeStatus,
    )
    from lmfleet.node.views import (
        FleetStatus,
        NodeSnapshot,
    )
    from lmfleet.routing.base import (
        Candidate,
        Decision,
        RequestInfo,
        Strategy,
    )
    from lmfleet.runtime import FleetRuntime
    from lmfleet.weights.session import (
        UpdateResult,
        UpdateTarget,
    )
    from lmfleet.weights.update import WeightUpdate

__version__ = "0.1.0"

_HOME = {
    **dict.fromkeys(
        ("FleetOptions", "HealthOptions", "NodeOptions", "OutlierOptions", "RoutingOptions"),
        "lmfleet.config",
    ),
    **dict.fromkeys(
        (
            "BatchError",
            "ConfigError",
            "EngineCapabilityError",
            "EventLoopError",
            "FleetBusyError",
            "FleetClosedError",
            "JournalMismatchError",
            "LaunchError",
            "LMFleetError",
            "MigrationError",
            "NodeCommandError",
            "NodeUnavailableError",
            "NoHealthyNodeError",
            "NotReadyError",
            "RecordedItemError",
            "RoutingError",
            "StreamInterruptedError",
            "UnfinishedItemError",
            "UnknownNodeError",
            "UnknownObjectError",
            "UnknownRequestError",
            "WeightUpdateError",
            "WeightUpdateUnsupportedError",
        ),
        "lmfleet.errors",
    ),
    **dict.fromkeys(("LMFleet",), "lmfleet.fleet"),
    **dict.fromkeys(("Journal",), "lmfleet.jobs.journal"),
    **dict.fromkeys(("BatchResult", "ItemError"), "lmfleet.jobs.results"),
    **dict.fromkeys(("NodeLoad",), "lmfleet.node.load"),
    **dict.fromkeys(("NodeRole", "NodeState", "NodeStatus"), "lmfleet.node.state"),
    **dict.fromkeys(("FleetStatus", "NodeSnapshot"), "lmfleet.node.views"),
    **dict.fromkeys(("Candidate", "Decision", "RequestInfo", "Strategy"), "lmfleet.routing.base"),
    **dict.fromkeys(("FleetRuntime",), "lmfleet.runtime"),
    **dict.fromkeys(("UpdateResult", "UpdateTarget"), "lmfleet.weights.session"),
    **dict.fromkeys(("WeightUpdate",), "lmfleet.weights.update"),
}
"""Each public name's module."""

__all__ = [
    "BatchError",
    "BatchResult",
    "Candidate",
    "ConfigError",
    "Decision",
    "EngineCapabilityError",
    "EventLoopError",
    "FleetBusyError",
    "FleetClosedError",
    "FleetOptions",
    "FleetRuntime",
    "FleetStatus",
    "HealthOptions",
    "ItemError",
    "Journal",
    "JournalMismatchError",
    "LMFleet",
    "LMFleetError",
    "LaunchError",
    "MigrationError",
    "NoHealthyNodeError",
    "NodeCommandError",
    "NodeLoad",
    "NodeOptions",
    "NodeRole",
    "NodeSnapshot",
    "NodeState",
    "NodeStatus",
    "NodeUnavailableError",
    "NotReadyError",
    "OutlierOptions",
    "RecordedItemError",
    "RequestInfo",
    "RoutingError",
    "RoutingOptions",
    "Strategy",
    "StreamInterruptedError",
    "UnfinishedItemError",
    "UnknownNodeError",
    "UnknownObjectError",
    "UnknownRequestError",
    "UpdateResult",
    "UpdateTarget",
    "WeightUpdate",
    "WeightUpdateError",
    "WeightUpdateUnsupportedError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'lmfleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once: later uses are plain lookups
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
