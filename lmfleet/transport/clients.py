"""Drop-in `openai.OpenAI` / `openai.AsyncOpenAI` clients whose transport routes each request.

The base URL is a placeholder that never resolves: the transport rewrites every
request to the node it picks, so a request that bypassed the router would fail
loudly instead of silently going somewhere.
"""

from __future__ import annotations

from typing import Any

import httpx2
import openai

from lmfleet.config import RoutingOptions
from lmfleet.transport import AsyncFleetTransport, FleetTransport, Planner
from lmfleet.transport.per_loop import PerLoopTransport
from lmfleet.transport.read_bound import bounded_transport

PLACEHOLDER_BASE_URL = "http://lmfleet.invalid/v1"
PLACEHOLDER_API_KEY = "lmfleet"
"""openai requires a key; each node's own key (if any) replaces it per request."""


def _limits(options: RoutingOptions) -> httpx2.Limits:
    size = options.max_connections
    return httpx2.Limits(max_connections=size, max_keepalive_connections=size)


def _settings(timeout: float | None, max_retries: int) -> dict[str, Any]:
    """What both clients are built with besides their transport."""
    return {
        "base_url": PLACEHOLDER_BASE_URL,
        "api_key": PLACEHOLDER_API_KEY,
        "max_retries": max_retries,
        "timeout": timeout if timeout is not None else openai.DEFAULT_TIMEOUT,
    }


def sync_client(
    planner: Planner, options: RoutingOptions, *, timeout: float | None, max_retries: int
) -> openai.OpenAI:
    inner = bounded_transport(_limits(options))
    http_client = httpx2.Client(transport=FleetTransport(planner, inner))
    return openai.OpenAI(http_client=http_client, **_settings(timeout, max_retries))


def async_client(
    planner: Planner, options: RoutingOptions, *, timeout: float | None, max_retries: int
) -> openai.AsyncOpenAI:
    limits = _limits(options)
    inner = PerLoopTransport(lambda: httpx2.AsyncHTTPTransport(limits=limits))
    http_client = httpx2.AsyncClient(transport=AsyncFleetTransport(planner, inner))
    return openai.AsyncOpenAI(http_client=http_client, **_settings(timeout, max_retries))
