"""Client-side routing over httpx2: the only package that sends requests to nodes."""

from lmfleet.transport.async_transport import AsyncFleetTransport
from lmfleet.transport.plan import RequestPlan
from lmfleet.transport.router import Router
from lmfleet.transport.sync_transport import FleetTransport

__all__ = ["AsyncFleetTransport", "FleetTransport", "RequestPlan", "Router"]
