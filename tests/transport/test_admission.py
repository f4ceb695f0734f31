"""The admission queue (transport/plan.py `Attempts.lease`): requests waiting for an
eligible node are counted across clients, bounded by `routing.admission_queue`, and
the count goes back to 0 however a wait ends."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import anyio
import httpx2
import openai
import pytest
from support import StartSim, chat, sim_stats, wait_until, wait_until_async

from lmfleet import LMFleet, NodeStatus
from lmfleet.config import RoutingOptions
from lmfleet.errors import FleetBusyError, NoHealthyNodeError
from lmfleet.node.outliers import Outcome
from lmfleet.registry import NodeRegistry
from lmfleet.routing import resolve_strategy
from lmfleet.routing.base import RequestInfo
from lmfleet.transport import AsyncFleetTransport, FleetTransport, Router
from lmfleet.transport.plan import Attempts
from lmfleet.transport.steps import Pause, Steps, T, drive_sync

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
URL = "http://placeholder/v1/chat/completions"
FAST = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "1")


def starved_router(**options: object) -> Router:
    """A router whose only node is still starting: every request waits."""
    registry = NodeRegistry()
    registry.add("http://a:1", models=("m",))
    opts = RoutingOptions(**{"wait_for_node": 5.0, "admission_queue": 2, **options})  # type: ignore[arg-type]
    return Router(registry, resolve_strategy("least_connections"), opts)


def ok(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, json={"ok": True})


def recording(
    steps: Steps[T], pauses: list[float], each: Callable[[], None] = lambda: None
) -> Steps[T]:
    """`steps` as the transport drives them (`drive_sync` performs each pause, as
    for a real request), noting each pause's length and calling `each` before it."""
    step = next(steps)
    while True:
        assert isinstance(step, Pause), step
        pauses.append(step.seconds)
        each()
        reply = yield step
        try:
            step = steps.send(reply)
        except StopIteration as done:
            return done.value


def test_a_full_queue_refuses_at_once_and_the_count_drains_as_waiters_give_up() -> None:
    router = starved_router(wait_for_node=1.0)
    registry = router.registry
    outcomes: list[str] = []

    async def wait_one(client: httpx2.AsyncClient) -> None:
        try:
            await client.post(URL, content=BODY)
        except NoHealthyNodeError:
            outcomes.append("gave up")

    async def main() -> None:
        transport = AsyncFleetTransport(router, httpx2.MockTransport(ok))
        async with (
            httpx2.AsyncClient(transport=transport) as client,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(wait_one, client)
            tg.start_soon(wait_one, client)
            await wait_until_async(lambda: registry.waiting == 2, timeout=5)
            started = time.monotonic()
            with pytest.raises(FleetBusyError) as caught:
                await client.post(URL, content=BODY)
            assert time.monotonic() - started < 0.5  # at once, not after wait_for_node
        message = str(caught.value)
        assert "admission queue is full" in message and "2 request(s)" in message, message
        assert "routing.admission_queue=2" in message
        assert caught.value.retry_after == 1.0
        assert isinstance(caught.value, openai.APIConnectionError)

    anyio.run(main)
    assert outcomes == ["gave up", "gave up"]
    assert registry.waiting == 0


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    router = starved_router()

    async def main() -> None:
        transport = AsyncFleetTransport(router, httpx2.MockTransport(ok))
        async with (
            httpx2.AsyncClient(transport=transport) as client,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(partial(client.post, URL, content=BODY))
            await wait_until_async(lambda: router.registry.waiting == 1, timeout=5)
            tg.cancel_scope.cancel()
        assert router.registry.waiting == 0

    anyio.run(main)


def test_a_zero_queue_refuses_every_wait_but_not_an_eligible_node() -> None:
    router = starved_router(admission_queue=0)
    with httpx2.Client(transport=FleetTransport(router, httpx2.MockTransport(ok))) as client:
        with pytest.raises(FleetBusyError, match=r"routing\.admission_queue=0"):
            client.post(URL, content=BODY)
        router.registry.modify("http://a:1", lambda s: s.evolve(status=NodeStatus.HEALTHY))
        assert client.post(URL, content=BODY).json() == {"ok": True}
    assert router.registry.waiting == 0


def test_waiters_are_served_once_a_node_wakes(start_sim: StartSim) -> None:
    """All asleep, no wake on demand: two requests wait, a third is refused with the
    typed error; a wakeup serves the two and the count is back at 0."""
    url = start_sim(*FAST).url
    with LMFleet.attach([url], health_interval=0.2, admission_queue=2, wait_for_node=30) as fleet:
        fleet.wait_ready(timeout=30)
        model = fleet.model
        fleet.sleep()
        client = fleet.client(max_retries=0)
        with ThreadPoolExecutor(2) as pool:
            waiters = [pool.submit(chat, client, model, f"wait {i}", max_tokens=2) for i in (1, 2)]
            wait_until(lambda: fleet.registry.waiting, timeout=10, until=lambda n: n == 2)
            started = time.monotonic()
            with pytest.raises(FleetBusyError, match="admission queue is full"):
                chat(client, model, "one too many", max_tokens=2)
            assert time.monotonic() - started < 1.0
            assert not any(w.done() for w in waiters)
            fleet.wakeup()
            replies = [w.result(timeout=30) for w in waiters]
        assert all(r.choices[0].message.content for r in replies)
        assert sim_stats(url)["completed"] == 2
        assert fleet.registry.waiting == 0


def test_the_callers_timeout_bounds_the_wait_on_both_clients(start_sim: StartSim) -> None:
    """`timeout=1` on a request with no eligible node: the typed error after about 1 s,
    not after wait_for_node (60 s); the sync and the async client alike."""
    url = start_sim(*FAST).url
    with LMFleet.attach([url], health_interval=0.2, wait_for_node=60) as fleet:
        fleet.wait_ready(timeout=30)
        model = fleet.model
        fleet.sleep()
        messages = [{"role": "user", "content": "in a hurry"}]
        client = fleet.client(max_retries=0)
        started = time.monotonic()
        with pytest.raises(NoHealthyNodeError, match="the caller's timeout") as caught:
            client.chat.completions.create(model=model, messages=messages, timeout=1)  # type: ignore[arg-type]
        assert time.monotonic() - started < 5.0
        assert isinstance(caught.value, openai.APIConnectionError)

        async def one() -> float:
            aclient = fleet.async_client(max_retries=0)
            started = time.monotonic()
            with pytest.raises(NoHealthyNodeError, match="the caller's timeout"):
                await aclient.chat.completions.create(
                    model=model,
                    messages=messages,  # type: ignore[arg-type]
                    timeout=1,
                )
            return time.monotonic() - started

        assert anyio.run(one) < 5.0
        assert fleet.registry.waiting == 0


def test_a_waiting_requests_pauses_never_run_past_the_callers_timeout() -> None:
    """The pauses between looks grow while no node could take the request (0.05,
    0.1, 0.2 s, ...), but the last one stops at the caller's deadline: the pauses the
    plan asks for add up to no more than the caller's 0.3 s (uncapped: 0.35 s)."""
    router = starved_router(wait_for_node=60.0)
    request = httpx2.Request("POST", URL, content=BODY)
    request.extensions["timeout"] = {"read": 0.3, "pool": 0.3}
    steps = Attempts(router.routing, request).lease(router.strategy, RequestInfo(), [])
    pauses: list[float] = []
    with pytest.raises(NoHealthyNodeError, match="the caller's timeout"):
        drive_sync(recording(steps, pauses), httpx2.MockTransport(ok))
    assert pauses[:2] == [0.05, 0.1] and sum(pauses) <= 0.3 + 0.001 * len(pauses), pauses
    assert router.registry.waiting == 0


def test_a_request_waiting_for_its_turn_past_wait_for_node_keeps_its_pace() -> None:
    """A healthy node serves it, but a request of a higher priority waits before it:
    it waits for its turn beyond `wait_for_node` (only its caller's timeout bounds
    that), looking every 50 ms, never spinning once the deadline is behind it."""
    router = starved_router(wait_for_node=0.1)
    router.registry.modify("http://a:1", lambda s: s.evolve(status=NodeStatus.HEALTHY))
    first = router.registry.enter_queue(10, RequestInfo(priority=5), time.monotonic())
    request = httpx2.Request("POST", URL, content=BODY)
    steps = Attempts(router.routing, request).lease(router.strategy, RequestInfo(), [])
    pauses: list[float] = []
    started = time.monotonic()

    left: list[float] = []

    def its_turn() -> None:  # well past wait_for_node, the one before it leaves
        if not left and time.monotonic() - started > 0.4:
            router.registry.leave_queue(first)
            left.append(time.monotonic())

    looks = recording(steps, pauses, each=its_turn)
    node, lease = drive_sync(looks, httpx2.MockTransport(ok))  # the next look leases it
    assert node.url == "http://a:1" and left
    lease.finish(Outcome.NEUTRAL)
    # 50 ms each, but the one cut short to end at `wait_for_node`: no spinning loop.
    assert max(pauses) == 0.05 and sum(1 for p in pauses if p < 0.05) <= 1, pauses
    assert router.registry.waiting == 0


def test_a_version_no_node_has_fails_at_once(start_sim: StartSim) -> None:
    """Version 99 asked, every node at 0, no update running: refused at once, saying so."""
    url = start_sim(*FAST).url
    with LMFleet.attach([url], health_interval=0.2, wait_for_node=60) as fleet:
        fleet.wait_ready(timeout=30)
        client = fleet.client(max_retries=0)
        started = time.monotonic()
        with pytest.raises(NoHealthyNodeError, match="no node is at weight version 99"):
            client.chat.completions.create(
                model=fleet.model,
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-lmfleet-weight-version": "99"},
            )
        assert time.monotonic() - started < 1.0
        with pytest.raises(NoHealthyNodeError, match="version 5 or later"):
            client.chat.completions.create(
                model=fleet.model,
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-lmfleet-min-weight-version": "5"},
            )
        assert fleet.registry.waiting == 0


def test_a_version_an_update_brings_is_waited_for() -> None:
    """While an update to version 3 runs, a request for version 3 waits (until the
    caller's own timeout here); once it has ended, the same ask fails at once."""
    router = starved_router(wait_for_node=30.0)
    router.registry.modify("http://a:1", lambda s: s.evolve(status=NodeStatus.HEALTHY))
    client = httpx2.Client(transport=FleetTransport(router, httpx2.MockTransport(ok)), timeout=0.5)
    headers = {"x-lmfleet-weight-version": "3"}
    router.registry.bring(3)
    started = time.monotonic()
    with pytest.raises(NoHealthyNodeError, match="the caller's timeout"):
        client.post(URL, content=BODY, headers=headers)
    assert time.monotonic() - started >= 0.5
    router.registry.brought(3)
    with pytest.raises(NoHealthyNodeError, match="no weight update is bringing it"):
        client.post(URL, content=BODY, headers=headers)


def test_a_request_cancelled_while_its_node_works_gives_its_slot_back(
    start_sim: StartSim,
) -> None:
    """Cancelled while the node has yet to send a byte: the node's in-flight count drops
    back at once, and the node is not marked as failing."""
    url = start_sim(*FAST, "--hang").url
    with LMFleet.attach([url], health_interval=0.2, first_byte_timeout=60) as fleet:
        fleet.wait_ready(timeout=30)
        model = fleet.model

        async def main() -> None:
            client = fleet.async_client(max_retries=0)
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(chat_async, client, model))
                await wait_until_async(lambda: fleet.registry.get(url).inflight == 1, timeout=10)
                tg.cancel_scope.cancel()
            await wait_until_async(lambda: fleet.registry.get(url).inflight == 0, timeout=2)

        anyio.run(main)
        node = fleet.registry.get(url)
        assert (node.inflight, node.errors, node.status) == (0, 0, NodeStatus.HEALTHY)


async def chat_async(client: openai.AsyncOpenAI, model: str) -> None:
    await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "never answered"}]
    )
