"""Node admin commands: sleep, wakeup, drain. They run in the fleet's event loop.

`POST /sleep` aborts every request in flight on an LMDeploy node, so a node is
first taken out of rotation and drained (bounded), then put to sleep. While a
command runs the node is "held": the monitor cannot put it back into rotation
from a `/health` that lags the truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import anyio
import httpx2

from lmfleet.errors import NodeCommandError
from lmfleet.health import fetch_models, is_sleeping
from lmfleet.registry import NodeRegistry
from lmfleet.state import NodeState, NodeStatus

JSON_HEADERS = {"Content-Type": "application/json"}
"""LMDeploy answers /sleep and /wakeup with 400 unless this header is present."""

WAKE_TAGS = ("weights", "kv_cache")


async def wait_idle(registry: NodeRegistry, url: str, timeout: float) -> bool:
    """Wait until no request is in flight on `url`; False if `timeout` ran out first."""
    deadline = time.monotonic() + timeout
    while True:
        state = registry.get(url)
        if state.inflight == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        await anyio.sleep(0.02)


async def post(
    client: httpx2.AsyncClient,
    node: NodeState,
    path: str,
    params: Sequence[tuple[str, str]],
    timeout: float,
) -> None:
    """POST an admin command; raise `NodeCommandError` unless the node says 200."""
    headers = dict(JSON_HEADERS)
    if node.api_key:
        headers["Authorization"] = f"Bearer {node.api_key}"
    try:
        response = await client.post(
            node.url + path, params=list(params), headers=headers, timeout=timeout
        )
    except httpx2.HTTPError as exc:
        raise NodeCommandError(f"{node.url}{path} failed: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise NodeCommandError(
            f"{node.url}{path} answered HTTP {response.status_code}: {response.text[:200]}"
        )


def _set(status: NodeStatus, message: str) -> Callable[[NodeState], NodeState]:
    def change(state: NodeState) -> NodeState:
        return state.evolve(status=status, message=message)

    return change


async def sleep_node(
    client: httpx2.AsyncClient,
    registry: NodeRegistry,
    url: str,
    level: int,
    *,
    drain_timeout: float,
    timeout: float,
) -> None:
    """Take `url` out of rotation, let its requests finish, then `POST /sleep?level=`."""
    registry.hold(url)
    try:
        before = registry.get(url).status
        registry.modify(url, _set(NodeStatus.SLEEPING, "going to sleep: draining"))
        await wait_idle(registry, url, drain_timeout)
        try:
            await post(client, registry.get(url), "/sleep", [("level", str(level))], timeout)
        except NodeCommandError:
            registry.modify(url, _set(before, "sleep failed"))
            raise
        registry.modify(url, _set(NodeStatus.SLEEPING, f"asleep (level {level})"))
    finally:
        registry.unhold(url)


async def wakeup_node(
    client: httpx2.AsyncClient,
    registry: NodeRegistry,
    url: str,
    tags: Sequence[str] | None,
    *,
    timeout: float,
) -> None:
    """`POST /wakeup[?tags=...]`; the node is routable again only when no tag sleeps."""
    registry.hold(url)
    try:
        node = registry.get(url)
        await post(client, node, "/wakeup", [("tags", t) for t in tags or ()], timeout)
        asleep = await is_sleeping(client, url, node.api_key, timeout)
        if asleep is None:  # no /is_sleeping: trust the wakeup only when it covered every tag
            asleep = bool(tags) and not set(WAKE_TAGS) <= set(tags or ())
        if asleep:
            registry.modify(
                url, _set(NodeStatus.SLEEPING, f"partly awake ({','.join(tags or ())})")
            )
            return
        models = await fetch_models(client, url, node.api_key, timeout)

        def awake(state: NodeState) -> NodeState:
            found = models if isinstance(models, tuple) else state.models
            return state.evolve(
                status=NodeStatus.HEALTHY, message="awake", models=found, failures=0
            )

        registry.modify(url, awake)
    finally:
        registry.unhold(url)


async def drain_node(registry: NodeRegistry, url: str, timeout: float) -> bool:
    """No new requests for `url`; wait for its in-flight ones; then it is `stopped`."""
    registry.modify(url, _set(NodeStatus.DRAINING, "draining"))
    idle = await wait_idle(registry, url, timeout)
    registry.modify(
        url,
        _set(NodeStatus.STOPPED, "drained" if idle else "drain timed out with requests in flight"),
    )
    return idle
