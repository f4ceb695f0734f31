"""Fixtures for the simulator tests: in-process ASGI clients and an anyio backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx2
import pytest

from lmfleet.sim import SimOptions, create_app

MODEL = "internlm/internlm2_5-7b-chat"

ClientFactory = Callable[..., AbstractAsyncContextManager[httpx2.AsyncClient]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def asgi_client() -> ClientFactory:
    """`async with asgi_client(fast=True, ...) as client:` — an app built in-process."""

    @asynccontextmanager
    async def make(**options: Any) -> AsyncIterator[httpx2.AsyncClient]:
        options.setdefault("health_poll_interval", 0)
        app = create_app(SimOptions(**options))
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://sim") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client

    return make


def chat_body(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
