"""Node states as pure data: no I/O, no locks.

`NodeState` is the immutable snapshot the router and the strategies read. The
registry replaces a node's snapshot on every change instead of mutating it, so a
strategy always sees one consistent view without holding any lock.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from lmfleet.config import NodeOptions
from lmfleet.node.load import NodeLoad
from lmfleet.plain_errors import ConfigError


class NodeStatus(str, Enum):
    """Where a node is in its life cycle.

    starting -> healthy <-> sleeping, healthy -> unhealthy -> healthy,
    healthy -> ejected -> healthy (on probation), any -> draining -> stopped.
    Only `healthy` nodes receive requests (`ejected` ones too in panic mode).
    `unhealthy` comes from health checks and unreachable nodes; `ejected` from the
    answers a node gives while its `/health` is green (see lmfleet/node/outliers.py).
    """

    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    EJECTED = "ejected"
    SLEEPING = "sleeping"
    DRAINING = "draining"
    STOPPED = "stopped"


class NodeRole(IntEnum):
    """LMDeploy's `EngineRole` as sent in `/nodes/add` (`status.role`)."""

    HYBRID = 1
    PREFILL = 2
    DECODE = 3


@dataclass(frozen=True)
class NodeState:
    """One node as the router sees it at one instant.

    Latencies are seconds, smoothed by an exponentially weighted moving average
    over successful (2xx) answers only; `None` means never measured (strategies give
    such nodes an optimistic prior so that new nodes get traffic). `served` counts
    successes, `errors` node failures (5xx, unreachable, timed out, cut streams);
    `error_rate` is the failure fraction of its `recent_answers` last answers (the
    outlier window, which starts afresh when the node is ejected: until its next answer
    an ejected node keeps the figures that ejected it), `streak` the failures in a
    row. `ejections` counts ejections since the node last succeeded on probation;
    `ejected_until` is a `time.monotonic()` instant. `load` is the node's latest
    `/metrics` report (None: not read yet, or the node exports none). `speed` is the
    node's relative speed as the operator gave it (LMDeploy's `speed`; 2.0 =
    twice as fast), None when the fleet should learn it from latency.
    `weight_version` is the version of the weights the node serves, as this fleet
    recorded it (LMDeploy reports none): the fleet's initial version until a weight
    update succeeds on the node. `quarantine` is why a weight update left the node
    out (asleep, out of routing, untouched by the monitor and wake-on-demand) until
    another update succeeds on it; empty otherwise.
    """

    url: str
    status: NodeStatus = NodeStatus.STARTING
    models: tuple[str, ...] = ()
    role: NodeRole = NodeRole.HYBRID
    inflight: int = 0
    peers: int = 0
    """Requests the other processes of this proxy have on the node (its workers, or
    replicas sharing a store), as they last shared them (lmfleet/proxy/shared.py):
    known within milliseconds, where the node's own report is up to an interval old."""
    served: int = 0
    errors: int = 0
    latency: float | None = None
    ttft: float | None = None
    message: str = ""
    failures: int = 0
    launched: bool = False
    registered: bool = False
    exited: int | None = None
    error_rate: float = 0.0
    recent_answers: int = 0
    streak: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    probation: bool = False
    load: NodeLoad | None = None
    speed: float | None = None
    priority: int = 0
    """Its tier (`attach(priorities=)`; higher is preferred: lmfleet/routing/tiers.py)."""
    weight_version: int = 0
    quarantine: str = ""
    capacity: float | None = None
    """Requests the node runs at once, as its `/metrics` showed when it last had a
    queue (`node.load.next_capacity`); None until then. A background request
    (lmfleet/priority.py) is not sent while the node holds that many, and
    `least_load` counts each request beyond it more (lmfleet/routing/least_load.py)."""
    engine: str | None = None
    """Its engine's profile name ("lmdeploy", "vllm", "sglang", "openai":
    lmfleet/node/profile.py), given (`NodeOptions.engine`) or recognised from its
    `/v1/models` when it first answers; None until then."""
    engine_version: str | None = None
    """The engine's version as the node reports it (vLLM `/version`, SGLang
    `/server_info`); None where it does not say (LMDeploy has no such route)."""
    cuts: int = 0
    """Weight updates that put the node to sleep with `in_flight="continue"`: a
    generation it aborts after this grew (since its lease) goes on elsewhere."""
    api_key: str | None = field(default=None, repr=False, compare=False)
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)
    """Extra headers sent with every request to the node (`NodeOptions`; secret)."""
    options: NodeOptions | None = field(default=None, compare=False)
    """The node's own settings as given (secrets masked in any repr), None: the fleet's."""

    @property
    def announced(self) -> bool:
        """Known to be coming up (launched here, or registered itself): such a node
        stays `starting`, never `unhealthy`, until it first answers."""
        return self.launched or self.registered

    @property
    def routable(self) -> bool:
        return self.status is NodeStatus.HEALTHY

    def held(self, now: float) -> float:
        """Every client's requests on the node: ours, our peers' (as shared), and the
        rest of its latest report (`NodeLoad.others`), what `least_load` ranks by."""
        held = float(self.inflight + self.peers)
        return held if self.load is None else held + self.load.others(now)

    def serves(self, model: str | None) -> bool:
        """True when the node serves `model`; `None` (model unknown) matches any node."""
        return model is None or model in self.models

    def evolve(self, **changes: object) -> NodeState:
        """A copy with `changes` applied (the only way a snapshot "changes").

        Every routed request evolves its node's state two or three times under the
        registry's lock, so this copies the instance's dict whole (two C-level dict
        updates; no slots, for that): `dataclasses.replace` (which calls `__init__`
        by keyword) took 6 µs of the proxy's ~300 µs per request, a copy slot by slot
        5 µs on a slow VM, this 2 µs. Nothing is validated (the fields are
        annotations); an unknown name is still a `TypeError`."""
        for name in changes:
            if name not in _FIELD_NAMES:
                raise TypeError(f"NodeState has no field {name!r}")
        copy = object.__new__(NodeState)
        values = copy.__dict__
        values.update(self.__dict__)
        values.update(changes)
        return copy


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(NodeState))


def parse_speed(value: object, where: str) -> float | None:
    """A node speed as given (None: not given); `ConfigError` unless a positive number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: a node speed must be a positive number, got {value!r}")
    speed = float(value)
    if not (math.isfinite(speed) and speed > 0.0):
        raise ConfigError(f"{where}: a node speed must be a positive number, got {value!r}")
    return speed


def parse_speeds(speeds: Sequence[float | None] | None, count: int) -> list[float | None]:
    """One speed per node (`speeds`, or none given), checked against `count`."""
    if speeds is None:
        return [None] * count
    if isinstance(speeds, (str, bytes)) or len(speeds) != count:
        raise ConfigError(f"speeds must give one number per URL ({count})")
    return [parse_speed(s, f"speeds[{i}]") for i, s in enumerate(speeds)]


def parse_role(value: NodeRole | int | str) -> NodeRole:
    """A node role from LMDeploy's number (1, 2, 3) or name ("hybrid", "Prefill", ...)."""
    try:
        if isinstance(value, str) and not value.isdigit():
            return NodeRole[value.strip().upper()]
        return NodeRole(int(value))
    except (KeyError, ValueError):
        raise ConfigError(
            f"node role must be hybrid/prefill/decode or 1/2/3, got {value!r}"
        ) from None


def parse_roles(roles: Sequence[NodeRole | int | str] | None, count: int) -> list[NodeRole]:
    """One role per node (`roles`, or all hybrid when None), checked against `count`."""
    if roles is None:
        return [NodeRole.HYBRID] * count
    if len(roles) != count:
        raise ConfigError(f"roles has {len(roles)} entries for {count} URLs")
    return [parse_role(r) for r in roles]
