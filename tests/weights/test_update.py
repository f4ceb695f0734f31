"""Weight updates over real simulated nodes: phases in order, versions, quarantine,
rolling under traffic, NCCL helpers, the one-call form and its async twin.

The nodes are `lmfleet sim` processes started with LMDeploy's preconditions
(`--backend pytorch --distributed-executor-backend ray`); each keeps a log of the
lifecycle calls it got and a digest of the buckets (lmfleet/sim/weights.py), which
is what these tests read. One fleet serves the module; every test moves the weight
version forward, so each starts where the last one left the fleet.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import anyio
import httpx2
import openai
import pytest
from support import LOADS_WEIGHTS, StartSim, chat, sim_stats, wait_until

from lmfleet import LMFleet, NodeStatus, UpdateTarget
from lmfleet.errors import ConfigError, NodeCommandError, NoHealthyNodeError, WeightUpdateError
from lmfleet.sim.weights import payload_digest

UPDATE = [
    "POST /sleep?level=1",
    "POST /wakeup?tags=weights",
]
FINISH = ["POST /wakeup?tags=kv_cache"]
_versions = itertools.count(1)
VERSIONS_PER_TEST = 10_000
"""Each test's versions are its `version` and above, below the next test's: versions
only go forward past an update that set the fleet's floor."""
WEIGHT_FLAGS = LOADS_WEIGHTS


@pytest.fixture(scope="module")
def fleet() -> Iterator[LMFleet]:
    with LMFleet.simulate(
        nodes=3,
        weight_updates=True,
        sim_args=["--ttft-ms", "5", "--tpot-ms", "2"],
        health_interval=0.2,
        wait_for_node=5,
        strategy="least_connections",
    ) as fleet:
        fleet.wait_ready(timeout=60)
        yield fleet


@pytest.fixture
def version(fleet: LMFleet) -> int:
    """A version newer than any the fleet has, with every node's call log cleared."""
    for node in fleet.nodes:
        httpx2.post(node.url + "/sim/stats/reset", timeout=5).raise_for_status()
    return next(_versions) * VERSIONS_PER_TEST


def calls(url: str) -> list[str]:
    return list(sim_stats(url)["admin_calls"])


def weights(url: str) -> dict[str, object]:
    return dict(sim_stats(url)["weights"])


def set_fault(url: str, **faults: object) -> None:
    httpx2.post(url + "/sim/faults", json=faults, timeout=5).raise_for_status()


def test_context_manager_runs_the_phases_in_order_and_records_the_version(
    fleet: LMFleet, version: int
) -> None:
    urls = [n.url for n in fleet.nodes]
    per_node = {url: [f"{url}-bucket-{i}" for i in range(3)] for url in urls}
    with fleet.weight_update(version) as update:
        assert sorted(t.url for t in update.nodes) == sorted(urls)
        # Inside the block every node is out of routing, asleep with its weights awake.
        assert all(n.state is NodeStatus.SLEEPING for n in fleet.nodes)
        update.push(lambda node: per_node[node.url])
    assert update.result is not None and update.result.ok
    assert sorted(update.result.updated) == sorted(urls)
    for url in urls:
        pushes = ["POST /update_weights"] * 2 + ["POST /update_weights finished"]
        assert calls(url) == UPDATE + pushes + FINISH
        ledger = weights(url)
        assert ledger["last_digest"] == payload_digest(per_node[url])  # every bucket, in order
        assert ledger["updated_while_serving"] == 0
    assert {n.weight_version for n in fleet.nodes} == {version}
    assert all(n.state is NodeStatus.HEALTHY for n in fleet.nodes)
    raw = fleet.client(max_retries=0).chat.completions.with_raw_response.create(
        model=fleet.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert raw.headers["x-lmfleet-weight-version"] == str(version)


def test_one_call_all_at_once_sends_each_body_list_and_ends_finished(
    fleet: LMFleet, version: int
) -> None:
    result = fleet.update_weights(
        [{"serialized_named_tensors": ["rank0", "rank1"]}, "last"], version=version
    )
    assert result.ok and len(result.updated) == 3
    for node in fleet.nodes:
        assert calls(node.url) == [
            *UPDATE,
            "POST /update_weights",
            "POST /update_weights finished",
            *FINISH,
        ]
        assert weights(node.url)["last_digest"] == payload_digest([["rank0", "rank1"], "last"])
        assert node.weight_version == version


def test_rolling_update_under_traffic_fails_no_request(fleet: LMFleet, version: int) -> None:
    client = fleet.client(max_retries=0)
    stop = threading.Event()
    failures: list[BaseException] = []
    served: list[str] = []
    out_at_once: list[int] = []

    def traffic() -> None:
        while not stop.is_set():
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=fleet.model,
                    messages=[{"role": "user", "content": "roll"}],
                    max_tokens=8,
                )
                served.append(raw.headers["x-lmfleet-weight-version"])
            except openai.OpenAIError as exc:
                failures.append(exc)

    def watch() -> None:
        while not stop.is_set():
            out_at_once.append(sum(n.state is not NodeStatus.HEALTHY for n in fleet.nodes))
            stop.wait(0.005)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    threads.append(threading.Thread(target=watch))
    for thread in threads:
        thread.start()
    previous = {str(n.weight_version) for n in fleet.nodes}
    try:
        wait_until(lambda: len(served) >= 20, what="traffic before the update")
        result = fleet.update_weights("w", version=version, rolling=1)
        before = len(served)
        wait_until(lambda: len(served) >= before + 20, what="traffic after the update")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert failures == []
    assert result.ok and len(result.updated) == 3
    assert max(out_at_once) == 1  # one node at a time left routing; the others served
    assert str(version) in served and previous & set(served)  # both served meanwhile
    assert all(weights(n.url)["updated_while_serving"] == 0 for n in fleet.nodes)


def test_a_failing_node_is_quarantined_with_its_reason_and_the_rest_update(
    fleet: LMFleet, version: int
) -> None:
    bad, *good = [n.url for n in fleet.nodes]
    set_fault(bad, update_weights_error=500)
    try:
        with fleet.weight_update(version) as update:
            update.push(["b0", "b1"])
        assert update.result is not None
        assert list(update.result.failed) == [bad]
        assert "HTTP 500" in update.result.failed[bad]
        node = {n.url: n for n in fleet.nodes}[bad]
        assert node.state is NodeStatus.SLEEPING and "HTTP 500" in node.quarantine
        assert weights(bad)["updates"] == 0  # it never finished loading
        with pytest.raises(NodeCommandError, match="quarantined"):
            fleet.wakeup(nodes=[bad])
        # The monitor sees a node that answers /health: it must not bring it back.
        probes = sim_stats(bad)["by_path"].get("/health", 0)
        wait_until(lambda: sim_stats(bad)["by_path"].get("/health", 0) >= probes + 3)
        assert {n.url: n for n in fleet.nodes}[bad].quarantine
        client = fleet.client(max_retries=0)
        for _ in range(6):
            chat(client, fleet.model, "after", max_tokens=2)
        assert sim_stats(bad)["completed"] == 0
        assert sorted(update.result.updated) == sorted(good)
    finally:
        set_fault(bad, update_weights_error=None)
    # A later update that succeeds on it brings it back.
    result = fleet.update_weights("again", version=version + 100, nodes=[bad], allow_mixed=True)
    assert result.ok
    node = {n.url: n for n in fleet.nodes}[bad]
    assert node.state is NodeStatus.HEALTHY and node.quarantine == ""
    fleet.update_weights("level", version=version + 200)  # every node level again


def test_a_payload_that_is_no_use_is_refused_before_any_node_sleeps(
    fleet: LMFleet, version: int
) -> None:
    """A payload given as data that misses a node, or holds no body, is the caller's
    mistake: `ConfigError` at once, every node still serving at its version (it put
    every node to sleep, then quarantined it: the fleet served nothing after one
    typo). A payload function is still judged node by node as it is sent."""
    before = {n.url: n.weight_version for n in fleet.nodes}
    first = fleet.nodes[0].url
    for payload, says in (
        ({first: "only this one"}, "no bodies for"),
        ([{"tensors": "misnamed"}], "a weight-update body is"),
        ((), "gave no bodies"),
    ):
        with pytest.raises(ConfigError, match=says):
            fleet.update_weights(payload, version=version)
    with pytest.raises(ConfigError, match="rolling must be"):
        fleet.update_weights("w", version=version, rolling=0)
    with pytest.raises(ConfigError, match="in_flight must be one of"):
        fleet.update_weights("w", version=version, in_flight="maybe")  # type: ignore[arg-type]
    assert all(calls(n.url) == [] for n in fleet.nodes)  # no sleep, no push
    assert {n.url: n.weight_version for n in fleet.nodes} == before
    assert all(n.state is NodeStatus.HEALTHY and not n.quarantine for n in fleet.nodes)
    every = {n.url: [f"w-{n.url}"] for n in fleet.nodes}  # one body list per node: fine
    assert fleet.update_weights(every, version=version).ok
    # Past an update that did not allow mixing, requests need `version` or newer: an
    # update to an older one would leave its nodes serving nothing.
    with pytest.raises(ConfigError, match=f"older than {version}.*{version + 1} or more"):
        fleet.update_weights("rollback", version=version - 1)
    assert all(n.weight_version == version and n.state is NodeStatus.HEALTHY for n in fleet.nodes)
    assert chat(fleet.client(max_retries=0), fleet.model, "still served", max_tokens=2)


def test_a_pinned_batch_never_mixes_versions(fleet: LMFleet, version: int) -> None:
    first, *rest = [n.url for n in fleet.nodes]
    fleet.update_weights("new", version=version + 1000, nodes=[first], allow_mixed=True)
    old = {n.url: sim_stats(n.url)["completed"] for n in fleet.nodes}
    prompts = [[{"role": "user", "content": f"p{i}"}] for i in range(12)]
    batch = fleet.chat_many(prompts, weight_version="current", max_tokens=2, progress=False)
    assert len(batch.ok) == 12
    done = {n.url: sim_stats(n.url)["completed"] - old[n.url] for n in fleet.nodes}
    assert done[first] == 12 and all(done[url] == 0 for url in rest)
    assert batch.weight_versions == [[[0, 2, version + 1000]]] * 12  # each item says so
    # Unpinned, the mixed fleet serves from every node: the pin is what kept it on one.
    mixed = fleet.chat_many(prompts, max_tokens=2, progress=False, concurrency=12)
    assert all(sim_stats(url)["completed"] > old[url] for url in rest)
    served = {segments[0][2] for segments in mixed.weight_versions if segments}
    assert served == {n.weight_version for n in fleet.nodes} and len(served) == 2
    fleet.update_weights("level", version=version + 1000, nodes=rest)


def test_max_staleness_routes_within_k_versions_of_the_newest(fleet: LMFleet, version: int) -> None:
    """A rolling update half done: `max_staleness=0` is served only by the updated
    node, a staleness that covers the gap by every node; through the fleet's client
    (header), a batch, and the proxy (body field); a negative staleness is a 400."""
    first, *rest = [n.url for n in fleet.nodes]
    older = {n.weight_version for n in fleet.nodes if n.url in rest}
    # Just ahead of every node (later tests count their versions from `version`).
    newest = max(n.weight_version for n in fleet.nodes) + 1
    fleet.update_weights("ahead", version=newest, nodes=[first], allow_mixed=True)
    gap = newest - min(older)
    old = {n.url: sim_stats(n.url)["completed"] for n in fleet.nodes}
    client = fleet.client(max_retries=0)
    fresh = {"x-lmfleet-max-staleness": "0"}
    for _ in range(6):
        chat(client, fleet.model, "fresh only", max_tokens=2, extra_headers=fresh)
    done = {n.url: sim_stats(n.url)["completed"] - old[n.url] for n in fleet.nodes}
    assert done[first] == 6 and all(done[url] == 0 for url in rest)
    prompts = [[{"role": "user", "content": f"s{i}"}] for i in range(12)]
    batch = fleet.chat_many(
        prompts, max_staleness=gap, max_tokens=2, progress=False, concurrency=12
    )
    assert len(batch.ok) == 12
    assert all(sim_stats(url)["completed"] > old[url] for url in rest)
    with pytest.raises(ConfigError, match="0 or more"):
        fleet.chat_many(prompts, max_staleness=-1, progress=False)
    proxy = fleet.serve(port=0)
    try:
        body = {"model": fleet.model, "messages": prompts[0], "max_tokens": 2}
        answer = httpx2.post(
            proxy.url + "/v1/chat/completions", json={**body, "max_staleness": 0}, timeout=10
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-lmfleet-weight-version"] == str(newest)
        refused = httpx2.post(
            proxy.url + "/v1/chat/completions",
            json=body,
            headers={"x-lmfleet-max-staleness": "-1"},
            timeout=10,
        )
        assert refused.status_code == 400 and "0 or more" in refused.json()["message"]
    finally:
        proxy.stop()
    fleet.update_weights("level", version=newest, nodes=rest)


def test_without_mixing_new_requests_go_only_to_the_new_version(
    fleet: LMFleet, version: int
) -> None:
    first, *rest = [n.url for n in fleet.nodes]
    fleet.update_weights("only", version=version + 2000, nodes=[first])
    old = {url: sim_stats(url)["completed"] for url in rest}
    client = fleet.client(max_retries=0)
    for _ in range(6):
        chat(client, fleet.model, "new only", max_tokens=2)
    assert all(sim_stats(url)["completed"] == old[url] for url in rest)
    with pytest.raises(NoHealthyNodeError, match="weight version >= 999999999"):
        chat(
            client,
            fleet.model,
            "too new",
            max_tokens=2,
            extra_headers={"x-lmfleet-min-weight-version": "999999999"},
        )
    with pytest.raises(openai.BadRequestError, match="integer weight version"):
        chat(client, fleet.model, "bad", extra_body={"min_weight_version": "soon"})
    fleet.update_weights("level", version=version + 2000, nodes=rest)


def test_nccl_helpers_post_to_every_node_around_the_broadcast(fleet: LMFleet, version: int) -> None:
    urls = [n.url for n in fleet.nodes]
    joined: list[int] = []
    seen_by_broadcast: list[int] = []

    def broadcast(bucket: object) -> None:
        # The nodes' receiving calls are already in flight when the trainer broadcasts.
        seen_by_broadcast.append(
            min(calls(u).count("POST /update_weights_from_distributed") for u in urls)
            + min(calls(u).count("POST /update_weights_from_distributed finished") for u in urls)
        )

    with fleet.weight_update(version) as update:
        offsets = update.init_group("127.0.0.1", 29500, join_fn=joined.append)
        assert sorted(offsets.values()) == [1, 2, 3] and joined == [4]
        assert all(sim_stats(u)["weights"]["groups"] == ["lmfleet"] for u in urls)
        buckets = [
            {"names": [f"w{i}"], "dtypes": ["bfloat16"], "shapes": [[2, 2]]} for i in range(2)
        ]
        update.update_from_distributed(buckets, broadcast)
        update.destroy_group()
    assert seen_by_broadcast == [1, 2]
    assert update.result is not None and update.result.ok
    assert all(weights(u)["updates"] == 1 and weights(u)["groups"] == [] for u in urls)

    failing = fleet.weight_update(version + 3000)
    with pytest.raises(WeightUpdateError, match="group destroyed"), failing as update:
        update.init_group("127.0.0.1", 29501)
        set_fault(urls[0], update_weights_error=500)
        try:
            update.update_from_distributed(buckets, lambda bucket: None)
        finally:
            set_fault(urls[0], update_weights_error=None)
    assert all(weights(u)["groups"] == [] for u in urls)  # destroyed everywhere
    assert all(n.quarantine for n in fleet.nodes)  # the block failed: nobody half-updated
    fleet.update_weights("recover", version=version + 3001)
    assert all(n.state is NodeStatus.HEALTHY for n in fleet.nodes)


@pytest.mark.parametrize("error", [ValueError("no tensors here"), KeyboardInterrupt()])
@pytest.mark.parametrize("twin", ["push", "apush"])
def test_push_and_apush_fail_a_node_the_same_way(
    fleet: LMFleet, version: int, twin: str, error: BaseException
) -> None:
    """One policy for both: the node whose payload failed is quarantined, the others
    take their weights, and the payload's error (even a KeyboardInterrupt, which
    must not end the fleet's loop) is raised once every node is done."""
    bad = fleet.nodes[0].url

    def payload(node: UpdateTarget) -> list[str]:
        if node.url == bad:
            raise error
        return [f"{twin}-{node.url}"]

    with fleet.weight_update(version) as update:
        with pytest.raises(type(error)) as raised:
            if twin == "push":
                update.push(payload)
            else:
                anyio.run(update.apush, payload)
        assert raised.value is error
    assert update.result is not None
    assert update.result.failed == {bad: f"{type(error).__name__}: {error}"}
    assert len(update.result.updated) == 2
    fleet.update_weights("recover", version=version + 5000)
    assert all(n.state is NodeStatus.HEALTHY for n in fleet.nodes)


@pytest.mark.anyio
async def test_async_twins(fleet: LMFleet, version: int) -> None:
    async with fleet.weight_update(version) as update:
        await update.apush(lambda node: [f"async-{node.url}"])
    assert update.result is not None and update.result.ok
    result = await fleet.aupdate_weights("one", version=version + 4000, rolling=2)
    assert result.ok and len(result.updated) == 3
    assert {n.weight_version for n in fleet.nodes} == {version + 4000}


def test_a_node_asleep_already_is_not_put_to_sleep_twice(fleet: LMFleet, version: int) -> None:
    sleeper = fleet.nodes[0].url
    fleet.sleep(nodes=[sleeper])
    result = fleet.update_weights("w", version=version)
    assert result.ok and sleeper in result.updated
    assert calls(sleeper) == [
        "POST /sleep?level=1",  # fleet.sleep's, the only one
        "POST /wakeup?tags=weights",
        "POST /update_weights finished",
        "POST /wakeup?tags=kv_cache",
    ]
    assert {n.url: n for n in fleet.nodes}[sleeper].state is NodeStatus.HEALTHY


def test_wake_on_demand_wakes_a_node_of_the_version_requests_may_use(
    start_sim: StartSim,
) -> None:
    """After a non-mixing update only new-version nodes may serve: waking an old one
    for a starved request would wake a node that cannot take it."""
    old, new = (start_sim("--fast", *WEIGHT_FLAGS) for _ in range(2))
    with LMFleet.attach(
        [old.url, new.url], health_interval=0.2, wake_on_demand=True, wait_for_node=20
    ) as fleet:
        fleet.wait_ready(timeout=30, min_ready=2)
        fleet.update_weights("new", version=1, nodes=[new.url])  # floor: version 1
        fleet.sleep()
        chat(fleet.client(max_retries=0), fleet.model, "wake the right one", max_tokens=2)
        assert sim_stats(new.url)["sleeping"] is False
        assert sim_stats(old.url)["sleeping"] is True  # first in line, but below the floor


def test_wake_on_demand_wakes_a_node_the_request_itself_may_use(start_sim: StartSim) -> None:
    """Versions mixed on purpose (no floor), both nodes asleep, a request asking for
    version 1 exactly: only the node that has it is woken, not the first in line."""
    old, new = (start_sim("--fast", *WEIGHT_FLAGS) for _ in range(2))
    with LMFleet.attach(
        [old.url, new.url], health_interval=0.2, wake_on_demand=True, wait_for_node=20
    ) as fleet:
        fleet.wait_ready(timeout=30, min_ready=2)
        fleet.update_weights("new", version=1, nodes=[new.url], allow_mixed=True)
        fleet.sleep()
        client = fleet.client(max_retries=0)
        exact = {"x-lmfleet-weight-version": "1"}
        chat(client, fleet.model, "version 1 only", max_tokens=2, extra_headers=exact)
        assert sim_stats(new.url)["sleeping"] is False
        assert sim_stats(old.url)["sleeping"] is True  # first in line, but not version 1
