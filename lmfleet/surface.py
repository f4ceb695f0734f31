"""`FleetSurface`: the part of a fleet that the proxy and the notebook layer may use.

Both front ends see a fleet only through this protocol: public members, no
private reach, and no import of `lmfleet.fleet`. So the fleet can mix the
notebook methods in and start the proxy without a circle of imports, and either
front end can be read (and tested) without the fleet's constructors in mind.
`LMFleet` matches it structurally.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import openai

from lmfleet.config import FleetOptions, NodeOptions
from lmfleet.node.admin import FleetAdmin
from lmfleet.node.state import NodeRole
from lmfleet.node.views import FleetStatus, NodeSnapshot
from lmfleet.registry import NodeRegistry
from lmfleet.runtime import FleetRuntime
from lmfleet.transport import Planner, Router
from lmfleet.transport.distserve import DistServe
from lmfleet.weights.bodies import Payload
from lmfleet.weights.session import InFlight, UpdateResult


class FleetSurface(Protocol):
    """What `LMFleet` offers the layers built on it (see lmfleet/fleet.py for each)."""

    @property
    def runtime(self) -> FleetRuntime: ...

    @property
    def options(self) -> FleetOptions: ...

    @property
    def registry(self) -> NodeRegistry: ...

    @property
    def router(self) -> Router: ...

    @property
    def planner(self) -> Planner:
        """The serving mode the transports drive: the router, or its DistServe."""
        ...

    @property
    def distserve(self) -> DistServe | None: ...

    @property
    def admin(self) -> FleetAdmin: ...

    @property
    def model(self) -> str: ...

    @property
    def models(self) -> list[str]: ...

    @property
    def nodes(self) -> list[NodeSnapshot]: ...

    def status(self) -> FleetStatus: ...

    def add_node(
        self,
        url: str,
        *,
        api_key: str | None = None,
        models: Sequence[str] = (),
        role: NodeRole = NodeRole.HYBRID,
        registered: bool = False,
        speed: float | None = None,
        priority: int | None = None,
        weight_version: int | None = None,
        origin: str | None = None,
        options: NodeOptions | Mapping[str, Any] | None = None,
        engine: str | None = None,
    ) -> NodeSnapshot: ...

    def remove_node(self, url: str) -> NodeSnapshot: ...

    async def aupdate_weights(
        self,
        payload: Payload,
        *,
        version: int,
        nodes: Sequence[str] | str | None = None,
        rolling: bool | int = False,
        level: int = 1,
        allow_mixed: bool | None = None,
        in_flight: InFlight = "continue",
    ) -> UpdateResult: ...

    def async_client(
        self, *, timeout: float | None = None, max_retries: int = 2
    ) -> openai.AsyncOpenAI: ...
