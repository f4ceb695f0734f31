"""LMFleet end to end: real `lmfleet sim` processes, real openai clients (issue 3 acceptance)."""

from __future__ import annotations

import random
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import anyio
import httpx2
import openai
import psutil
import pytest
from support import (
    StartSim,
    chat,
    kill_mid_stream,
    sim_served,
    sim_stats,
    sims_inflight,
    wait_until,
    wait_until_async,
)

from lmfleet import (
    ConfigError,
    FleetClosedError,
    LMFleet,
    NodeStatus,
    NoHealthyNodeError,
    NotReadyError,
    StreamInterruptedError,
)
from lmfleet.routing import RandomStrategy

MODEL = "internlm/internlm2_5-7b-chat"
FAST = ("--health-poll-interval", "0.5", "--ttft-ms", "5", "--tpot-ms", "2")
LONG = (*FAST, "--output-tokens", "400")  # about a second per request
HOLD = (*FAST[:2], "--ttft-ms", "5", "--tpot-ms", "10", "--output-tokens", "200")  # 2 s each


@pytest.fixture
def three_nodes(start_sim: StartSim) -> list[str]:
    return [start_sim(*FAST).url for _ in range(3)]


@pytest.fixture
def fleet_of(three_nodes: list[str]) -> Iterator[Callable[..., LMFleet]]:
    fleets: list[LMFleet] = []

    def make(strategy: object = "least_connections", **kwargs: object) -> LMFleet:
        fleet = LMFleet.attach(three_nodes, strategy=strategy, health_interval=0.2, **kwargs)  # type: ignore[arg-type]
        fleets.append(fleet)
        fleet.wait_ready(timeout=30, min_ready=3)
        return fleet

    yield make
    for fleet in fleets:
        fleet.close()


def test_round_robin_is_exact(fleet_of: Callable[..., LMFleet], three_nodes: list[str]) -> None:
    fleet = fleet_of("round_robin")
    client = fleet.client()
    for i in range(300):
        chat(client, fleet.model, f"hello {i}", max_tokens=1)
    assert {n.url: n.served for n in fleet.nodes} == {url: 100 for url in three_nodes}
    assert [sim_served(url) for url in three_nodes] == [100, 100, 100]
    assert all(n.inflight == 0 for n in fleet.nodes)


def test_least_connections_spreads_concurrent_requests(start_sim: StartSim) -> None:
    urls = [start_sim(*HOLD).url for _ in range(3)]
    fleet = LMFleet.attach(urls, strategy="least_connections", health_interval=0.2)
    fleet.wait_ready(timeout=30, min_ready=3)
    client = fleet.async_client()
    peak: dict[str, list[int]] = {}

    async def main() -> None:
        async def one(i: int) -> None:
            await client.chat.completions.create(
                model=fleet.model,
                messages=[{"role": "user", "content": f"q{i}"}],
                max_tokens=200,
            )

        async with anyio.create_task_group() as tg:
            for i in range(31):
                tg.start_soon(one, i)
            # Every request has reached its sim and none has finished (each takes 2 s):
            # the sims' own in-flight counts, then the registry's leases, at their peak.
            at_sims = await wait_until_async(
                lambda: sims_inflight(urls),
                what="all 31 requests in flight at the sims",
                until=lambda counts: sum(counts) == 31,
            )
            peak["registry"] = sorted(n.inflight for n in fleet.nodes)
            peak["sims"] = sorted(at_sims)

    with fleet:
        anyio.run(main)
        assert peak == {"registry": [10, 10, 11], "sims": [10, 10, 11]}
        assert all(n.inflight == 0 for n in fleet.nodes)
        assert sum(sim_served(url) for url in urls) == 31  # and every one completed


@pytest.mark.parametrize("strategy", ["least_connections", "min_observed_latency", "power_of_two"])
def test_slow_node_gets_less_than_random(start_sim: StartSim, strategy: str) -> None:
    slow = start_sim(*FAST, "--speed", "0.333").url
    fast = [start_sim(*FAST).url for _ in range(2)]

    def slow_share(spec: object) -> float:
        with LMFleet.attach([slow, *fast], strategy=spec, health_interval=0.5) as fleet:  # type: ignore[arg-type]
            fleet.wait_ready(timeout=30, min_ready=3)
            client = fleet.async_client()

            async def main() -> None:
                limiter = anyio.Semaphore(9)

                async def one(i: int) -> None:
                    async with limiter:
                        await client.chat.completions.create(
                            model=fleet.model,
                            messages=[{"role": "user", "content": f"q{i}"}],
                            max_tokens=20,
                        )

                async with anyio.create_task_group() as tg:
                    for i in range(120):
                        tg.start_soon(one, i)

            anyio.run(main)
            served = {n.url: n.served for n in fleet.nodes}
        return served[slow] / sum(served.values())

    baseline = slow_share(RandomStrategy(rng=random.Random(7)))
    share = slow_share(strategy)
    assert baseline > 0.25
    assert share < baseline - 0.08, (strategy, share, baseline)


def test_sleeping_node_gets_nothing_until_woken(
    fleet_of: Callable[..., LMFleet], three_nodes: list[str]
) -> None:
    fleet = fleet_of("round_robin")
    client = fleet.client()
    sleeper = three_nodes[0]
    fleet.sleep(level=1, nodes=sleeper)  # one URL alone: that node, not its characters
    assert httpx2.get(sleeper + "/is_sleeping").json() == {"is_sleeping": True}
    before = sim_served(sleeper)
    probes = sim_stats(sleeper)["by_path"].get("/health", 0)
    for i in range(30):
        chat(client, fleet.model, f"while asleep {i}", max_tokens=1)
    # Several of the fleet's health probes (0.2 s apart) reach the sleeper, spanning the
    # 0.5 s for which its /health lags and still says "healthy": none may revive it.
    wait_until(
        lambda: sim_stats(sleeper)["by_path"].get("/health", 0),
        what="5 health probes of the sleeping node",
        until=lambda seen: seen >= probes + 5,
    )
    for i in range(10):
        chat(client, fleet.model, f"still asleep {i}", max_tokens=1)
    assert sim_served(sleeper) == before
    assert {n.url: n.state for n in fleet.nodes}[sleeper] is NodeStatus.SLEEPING

    # A tag the engine does not know would be ignored by it, leaving the node asleep
    # with no word said: refused before any node is called.
    with pytest.raises(ConfigError, match="no wake-up tag 'weight'; its tags: weights, kv_cache"):
        fleet.wakeup(tags="weight", nodes=sleeper)
    assert "/wakeup" not in sim_stats(sleeper)["by_path"]
    fleet.wakeup(nodes=[sleeper])
    assert {n.url: n.state for n in fleet.nodes}[sleeper] is NodeStatus.HEALTHY
    for i in range(9):
        chat(client, fleet.model, f"awake {i}", max_tokens=1)
    assert sim_served(sleeper) == before + 3


def test_all_asleep_wake_on_demand(fleet_of: Callable[..., LMFleet]) -> None:
    fleet = fleet_of("least_connections", wake_on_demand=True)
    fleet.sleep()
    assert all(n.state is NodeStatus.SLEEPING for n in fleet.nodes)
    reply = chat(fleet.client(), fleet.model, "wake up, someone", max_tokens=2)
    assert reply.choices[0].message.content
    assert sum(n.state is NodeStatus.HEALTHY for n in fleet.nodes) == 1


def test_sigkill_under_load(start_sim: StartSim) -> None:
    nodes = [start_sim(*LONG) for _ in range(3)]
    victim = nodes[0]
    with LMFleet.attach([n.url for n in nodes], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30, min_ready=3)
        client = fleet.async_client(max_retries=0)
        outcomes: Counter[str] = Counter()

        async def plain(i: int) -> None:
            await client.chat.completions.create(
                model=fleet.model, messages=[{"role": "user", "content": f"p{i}"}], max_tokens=100
            )
            outcomes["plain ok"] += 1

        async def streamed(i: int) -> None:
            stream = await client.chat.completions.create(
                model=fleet.model,
                messages=[{"role": "user", "content": f"s{i}"}],
                max_tokens=400,
                stream=True,
            )
            try:
                async for _ in stream:
                    pass
                outcomes["stream ok"] += 1
            except StreamInterruptedError as exc:  # typed, and an openai.APIConnectionError
                assert isinstance(exc, openai.APIConnectionError)
                assert victim.url in str(exc)
                outcomes["stream interrupted"] += 1

        async def main() -> None:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for i in range(30):
                        tg.start_soon(plain, i)
                        tg.start_soon(streamed, i)
                    # Plain requests need 0.2 s, streams 0.8 s: kill while the victim
                    # generates streams (by its own count; a loaded client reads late).
                    await kill_mid_stream(victim, streams=2)

        anyio.run(main)
        assert outcomes["plain ok"] == 30, outcomes
        assert outcomes["stream ok"] + outcomes["stream interrupted"] == 30
        assert outcomes["stream interrupted"] >= 1
        wait_until(
            lambda: {n.url: n.state for n in fleet.nodes}[victim.url] is NodeStatus.UNHEALTHY
        )
        assert all(n.inflight == 0 for n in fleet.nodes)

        revived = start_sim(*FAST, port=victim.port)
        wait_until(lambda: {n.url: n.state for n in fleet.nodes}[revived.url] is NodeStatus.HEALTHY)
        before = sim_served(revived.url)
        sync_client = fleet.client()
        for i in range(9):
            chat(sync_client, fleet.model, f"after {i}", max_tokens=1)
        assert sim_served(revived.url) > before


def test_models_routing_and_unknown_model(start_sim: StartSim) -> None:
    a = start_sim(*FAST, "--model", "model-a").url
    b = start_sim(*FAST, "--model", "model-b").url
    with LMFleet.attach([a, b], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30, min_ready=2)
        assert fleet.models == ["model-a", "model-b"]
        client = fleet.client()
        for i in range(6):
            chat(client, "model-b", f"q{i}", max_tokens=1)
        assert (sim_served(a), sim_served(b)) == (0, 6)
        with pytest.raises(openai.NotFoundError, match="model-a, model-b"):
            chat(client, "model-c", "q", max_tokens=1)


def test_unreachable_url_at_attach(start_sim: StartSim) -> None:
    good = start_sim(*FAST).url
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    with LMFleet.attach([good, dead], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30, min_ready=1)
        wait_until(lambda: {n.url: n.state for n in fleet.nodes}[dead] is NodeStatus.UNHEALTHY)
        node = {n.url: n for n in fleet.nodes}[dead]
        assert "unreachable" in node.message
        assert "unhealthy" in repr(fleet)
        chat(fleet.client(), fleet.model, "hi", max_tokens=1)
        with pytest.raises(NotReadyError) as caught:  # and wait_ready says why, per node
            fleet.wait_ready(timeout=0.1, min_ready=2)
    head, reason, *rest = str(caught.value).splitlines()
    assert head == "1 of 2 nodes healthy after 0.1 s (2 needed):"
    assert reason.startswith(f"  {dead}: unhealthy (") and "Connection refused" in reason
    assert good in "\n".join(rest)  # the table follows, with every node
    assert not any(line.startswith(f"  {good}:") for line in rest)  # healthy: no reason


def test_client_features(fleet_of: Callable[..., LMFleet]) -> None:
    fleet = fleet_of()
    client = fleet.client()
    raw = client.chat.completions.with_raw_response.create(
        model=fleet.model, messages=[{"role": "user", "content": "raw"}], max_tokens=3
    )
    assert raw.http_request.url.host == "127.0.0.1"
    assert raw.parse().usage is not None
    quick = client.with_options(timeout=5.0).chat.completions.create(
        model=fleet.model,
        messages=[{"role": "user", "content": "quick"}],
        max_tokens=2,
        extra_body={"top_k": 5, "session_id": 7},
    )
    assert quick.choices[0].finish_reason == "length"
    chunks = list(
        client.chat.completions.create(
            model=fleet.model,
            messages=[{"role": "user", "content": "stream"}],
            max_tokens=4,
            stream=True,
        )
    )
    assert chunks and chunks[-1].choices[0].finish_reason == "length"
    assert all(n.inflight == 0 for n in fleet.nodes)


@pytest.mark.anyio
async def test_async_client_in_a_running_loop(fleet_of: Callable[..., LMFleet]) -> None:
    fleet = await anyio.to_thread.run_sync(fleet_of)
    async with fleet.async_client() as client:
        reply = await client.chat.completions.create(
            model=fleet.model, messages=[{"role": "user", "content": "loop"}], max_tokens=2
        )
    assert reply.choices[0].message.content


def test_drain_add_remove(fleet_of: Callable[..., LMFleet], three_nodes: list[str]) -> None:
    fleet = fleet_of("round_robin")
    client = fleet.client()
    assert fleet.drain(three_nodes[0], timeout=5) is True
    fleet.remove_node(three_nodes[1])
    before = sim_served(three_nodes[0])
    for i in range(4):
        chat(client, fleet.model, f"q{i}", max_tokens=1)
    assert sim_served(three_nodes[0]) == before
    assert [n.url for n in fleet.nodes] == [three_nodes[0], three_nodes[2]]
    fleet.add_node(three_nodes[0])
    wait_until(lambda: fleet.nodes[0].state is NodeStatus.HEALTHY)


def test_simulate_and_close_leave_nothing_behind() -> None:
    threads_before = set(threading.enumerate())
    with LMFleet.simulate(nodes=2, sim_args=FAST, health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        pids = [proc.pid for proc in fleet.processes.values()]
        assert all(psutil.pid_exists(pid) for pid in pids)
        chat(fleet.client(), fleet.model, "hi", max_tokens=1)
        assert "internlm" in fleet.logs(fleet.nodes[0].url) or fleet.logs(fleet.nodes[0].url) == ""
    fleet.close()  # idempotent
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids
    )
    wait_until(lambda: set(threading.enumerate()) <= threads_before, timeout=5)


def test_close_after_an_exception_inside_with() -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        LMFleet.simulate(nodes=1, sim_args=FAST) as fleet,
    ):
        pids = [proc.pid for proc in fleet.processes.values()]
        raise RuntimeError("boom")
    wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), timeout=10)


def test_clients_of_a_closed_fleet_raise_fleet_closed(start_sim: StartSim) -> None:
    """The node outlives the fleet, so only the fleet can refuse: a client taken
    before `close()` raises the typed error instead of routing on unwatched."""
    node = start_sim(*FAST)
    fleet = LMFleet.attach([node.url], health_interval=0.2)
    fleet.wait_ready(timeout=30)
    client, aclient = fleet.client(max_retries=0), fleet.async_client(max_retries=0)
    assert chat(client, fleet.model, "before", max_tokens=1).choices
    model, served = fleet.model, sim_served(node.url)
    fleet.close()
    with pytest.raises(FleetClosedError, match="fleet is closed") as caught:
        chat(client, model, "after", max_tokens=1)
    assert isinstance(caught.value, openai.APIConnectionError)  # code written for openai
    assert isinstance(caught.value, RuntimeError)  # and for what close() raised before

    async def main() -> None:
        async with aclient:
            with pytest.raises(FleetClosedError, match="fleet is closed"):
                await aclient.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "after"}], max_tokens=1
                )
            with pytest.raises(FleetClosedError):
                await aclient.models.list()

    anyio.run(main)
    assert sim_served(node.url) == served  # nothing reached the node
    with pytest.raises(FleetClosedError):
        fleet.client()


def test_no_healthy_node_is_a_typed_error_after_wait_for_node(
    fleet_of: Callable[..., LMFleet],
) -> None:
    fleet = fleet_of("least_connections", wait_for_node=0.3)
    fleet.sleep()
    client = fleet.client()  # openai's default max_retries=2: it must not retry on top
    with pytest.raises(NoHealthyNodeError) as caught:
        chat(client, fleet.model, "anyone?", max_tokens=1)
    assert isinstance(caught.value, openai.APIConnectionError)  # code written for openai
    assert "within 0.3 s" in str(caught.value) and "sleeping" in str(caught.value)


@pytest.mark.anyio
async def test_async_context_manager(three_nodes: list[str]) -> None:
    async with LMFleet.attach(three_nodes, health_interval=0.2) as fleet:
        await anyio.to_thread.run_sync(lambda: fleet.wait_ready(timeout=30))
        async with fleet.async_client() as client:
            reply = await client.chat.completions.create(
                model=fleet.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
        assert reply.choices[0].finish_reason == "length"
    assert repr(fleet) == "<LMFleet closed>"


def test_a_node_is_one_key_whatever_the_spelling() -> None:
    with LMFleet.attach(["http://127.0.0.1:8"], health_interval=60) as fleet:
        added = fleet.add_node("127.0.0.1:9")
        assert added.url == "http://127.0.0.1:9"
        assert fleet.drain("127.0.0.1:9/v1", timeout=0) is True
        assert fleet.remove_node("127.0.0.1:9").url == "http://127.0.0.1:9"
        assert [n.url for n in fleet.nodes] == ["http://127.0.0.1:8"]


# -- attach's input checks and wait_ready's reasons (issue 14) ----------------------------


@pytest.mark.parametrize("urls", [["not a url"], ["http://127.0.0.1:9", "notaurl::"], []])
def test_attach_rejects_bad_input_before_starting_anything(urls: list[str]) -> None:
    before = set(threading.enumerate())
    with pytest.raises(ConfigError) as caught:
        LMFleet.attach(urls)
    message = str(caught.value)
    if urls:
        assert repr(urls[-1]) in message and "http(s)://host[:port]" in message
    else:
        assert "allow_empty=True" in message
    assert set(threading.enumerate()) <= before  # no half-built fleet left running


@pytest.mark.parametrize(
    ("speeds", "says"),
    [([1.0], "one number per URL (2)"), ([1.0, 0.0], "speeds[1]"), ([1.0, "x"], "speeds[1]")],
)
def test_attach_checks_the_speeds(speeds: list[object], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        LMFleet.attach(["http://127.0.0.1:8", "http://127.0.0.1:9"], speeds=speeds)  # type: ignore[arg-type]


def test_attach_keeps_the_given_speeds() -> None:
    urls = ["http://127.0.0.1:8", "http://127.0.0.1:9"]
    with LMFleet.attach(urls, speeds=[1, 0.5], strategy="least_load") as fleet:
        assert [n.speed for n in fleet.nodes] == [1.0, 0.5]
        fleet.add_node("http://127.0.0.1:7")
        assert {n.url: n.speed for n in fleet.nodes}["http://127.0.0.1:7"] is None


def test_attach_empty_when_allowed_then_nodes_join(start_sim: StartSim) -> None:
    """`allow_empty=True`: a proxy's fleet, whose nodes join later."""
    with LMFleet.attach([], allow_empty=True, health_interval=0.2) as fleet:
        assert fleet.nodes == []
        with pytest.raises(NotReadyError, match="the fleet has no nodes"):
            fleet.wait_ready(timeout=0.1)
        fleet.add_node(start_sim(*FAST).url)
        fleet.wait_ready(timeout=30)
        # The number asked for is waited for, beyond the nodes there are now (it
        # returned with one of two before: a caller waiting for its nodes to join).
        with pytest.raises(NotReadyError, match=r"1 of 1 nodes healthy .*\(2 needed\)"):
            fleet.wait_ready(timeout=0.5, min_ready=2)
        second = start_sim(*FAST).url
        joining = threading.Timer(0.3, fleet.add_node, (second,))
        joining.start()
        try:
            ready = fleet.wait_ready(timeout=30, min_ready=2)
        finally:
            joining.join()
        assert sum(n.state is NodeStatus.HEALTHY for n in ready.nodes) == 2
        with pytest.raises(ConfigError, match="min_ready must be >= 1"):
            fleet.wait_ready(min_ready=0)


def test_simulated_speeds_must_be_positive() -> None:
    for speed in (0, -1.0, [1.0, float("nan")]):
        with pytest.raises(ConfigError, match="speed must be a number > 0"):
            LMFleet.simulate(nodes=2, speed=speed)


def test_attach_takes_one_url_as_a_string(start_sim: StartSim) -> None:
    url = start_sim(*FAST).url
    with LMFleet.attach(url + "/v1/", health_interval=0.2) as fleet:
        assert [n.url for n in fleet.nodes] == [url]
        fleet.wait_ready(timeout=30)
        chat(fleet.client(max_retries=0), fleet.model, "hi", max_tokens=1)


def test_unknown_model_404_lists_the_served_models() -> None:
    """One model served: routing skips reading the body, yet a request for another
    model gets the fleet's 404 naming what it serves (not the node's bare 404)."""
    with LMFleet.simulate(nodes=1, health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=60)
        client = fleet.client(max_retries=0)
        with pytest.raises(openai.NotFoundError) as caught:
            chat(client, "no-such-model", "hi", max_tokens=1)
        error = caught.value
        served = f"The model 'no-such-model' does not exist; served models: {MODEL}"
        assert error.message.endswith(served)  # openai's "Error code: 404 - " prefix
        assert error.body == {
            "object": "error",
            "message": served,
            "type": "not_found_error",
            "param": "model",
            "code": 404,
        }
        asked = sim_stats(fleet.nodes[0].url)["by_path"]
        assert "/v1/chat/completions" not in asked  # the fleet answered, not the node
        assert chat(client, MODEL, "hi", max_tokens=1).choices  # the served one still routes


def test_the_batch_api_on_a_fleets_client_points_to_the_proxy(start_sim: StartSim) -> None:
    """Files and batches live in one place, the proxy: a fleet's client answers them
    with a 404 saying where they are, and asks no node (whose own would be a bare
    404, or an SGLang node's files unknown to the next node)."""
    url = start_sim(*FAST).url
    with LMFleet.attach([url], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        client = fleet.client(max_retries=0)
        with pytest.raises(openai.NotFoundError, match=r"fleet.serve\(\), lmfleet serve"):
            client.files.create(file=("in.jsonl", b"{}"), purpose="batch")
        with pytest.raises(openai.NotFoundError, match="chat_many"):
            client.batches.list()
        asked = sim_stats(url)["by_path"]
        assert not [path for path in asked if path.startswith(("/v1/files", "/v1/batches"))]


def test_an_http_proxy_in_the_environment_does_not_hide_the_nodes(
    start_sim: StartSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clusters often set `http_proxy`: the routed requests never read it (their
    transports are the fleet's), and the fleet's own probes must not either, or
    every node looks unreachable while it serves (they went through the proxy)."""
    url = start_sim(*FAST).url
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    with LMFleet.attach([url], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        assert chat(fleet.client(max_retries=0), MODEL, "direct", max_tokens=1).choices
