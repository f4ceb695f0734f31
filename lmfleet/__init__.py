"""lmfleet: run and load-balance a fleet of LMDeploy api_server nodes from Python."""

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
from lmfleet.jobs.results import BatchResult, ItemError
from lmfleet.node.load import NodeLoad
from lmfleet.node.state import NodeRole, NodeState, NodeStatus
from lmfleet.node.views import FleetStatus, NodeSnapshot
from lmfleet.routing.base import Candidate, Decision, RequestInfo, Strategy
from lmfleet.runtime import FleetRuntime
from lmfleet.weights.session import UpdateResult, UpdateTarget
from lmfleet.weights.update import WeightUpdate

__version__ = "0.1.0"

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
