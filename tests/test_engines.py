"""One fleet over LMDeploy, vLLM and SGLang nodes (`lmfleet sim --engine`, real
processes): each recognised from its own answers, one pool for routing through the
client and the proxy, its load read from its own `/metrics`, put to sleep and woken
each through its own routes, and what an engine cannot do refused by name."""

from __future__ import annotations

from collections.abc import Callable

import httpx2
import pytest
from support import StartSim, chat, sim_served, sim_stats, wait_until

from lmfleet import EngineCapabilityError, LMFleet, NodeStatus
from lmfleet.notebook.dashboard import Dashboard

MODEL = "internlm/internlm2_5-7b-chat"


@pytest.fixture
def mixed(start_sim: StartSim) -> dict[str, str]:
    """engine -> URL of one simulated node of each engine."""
    return {
        engine: start_sim("--engine", engine, "--fast").url
        for engine in ("lmdeploy", "vllm", "sglang")
    }


def engines_of(fleet: LMFleet) -> dict[str, tuple[str | None, str | None]]:
    return {n.url: (n.engine, n.engine_version) for n in fleet.nodes}


def test_a_mixed_fleet_is_one_pool_through_both_doors(
    mixed: dict[str, str], serve_fleet: Callable[..., tuple[LMFleet, object]]
) -> None:
    fleet, server = serve_fleet(list(mixed.values()), strategy="least_load")
    assert engines_of(fleet) == {
        mixed["lmdeploy"]: ("lmdeploy", None),  # LMDeploy has no version route
        mixed["vllm"]: ("vllm", "0.33.0"),
        mixed["sglang"]: ("sglang", "0.5.23"),
    }
    table = str(fleet)
    assert "vllm 0.33.0" in table and "sglang 0.5.23" in table
    board = Dashboard(fleet)
    shown_on_board = {url: row.texts()["engine"] for url, row in board.rows.items()}
    assert shown_on_board == {
        mixed["lmdeploy"]: "lmdeploy",
        mixed["vllm"]: "vllm 0.33.0",
        mixed["sglang"]: "sglang 0.5.23",
    }
    board.stop()
    # Each node's own load, from its own /metrics names.
    wait_until(lambda: all(n.queue is not None for n in fleet.nodes), timeout=10)

    client = fleet.client(max_retries=0)
    for i in range(12):
        assert chat(client, MODEL, f"client {i}", max_tokens=4).choices[0].message.content
    proxied = httpx2.Client(base_url=server.url, timeout=10)  # type: ignore[attr-defined]
    for i in range(12):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"proxy {i}"}]}
        answer = proxied.post("/v1/chat/completions", json=body | {"max_tokens": 4})
        assert answer.status_code == 200, answer.text
    assert all(sim_served(url) > 0 for url in mixed.values()), {
        url: sim_served(url) for url in mixed.values()
    }
    status = proxied.get("/nodes/status").json()
    shown = {
        url: (entry.get("engine"), entry.get("engine_version")) for url, entry in status.items()
    }
    assert shown == engines_of(fleet)
    assert 'lmfleet_node_engine{engine="vllm"' in proxied.get("/metrics").text
    proxied.close()


def test_sleep_and_wake_go_through_each_engines_own_routes(mixed: dict[str, str]) -> None:
    with LMFleet.attach(list(mixed.values()), health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        fleet.sleep()
        assert all(sim_stats(url)["sleeping"] for url in mixed.values())
        calls = {engine: sim_stats(url)["by_path"] for engine, url in mixed.items()}
        assert calls["lmdeploy"].get("/sleep") == 1
        assert calls["vllm"].get("/sleep") == 1
        assert calls["sglang"].get("/release_memory_occupation") == 1
        # Several health rounds later every node is still asleep: vLLM says so at
        # /is_sleeping, and SGLang, which cannot say, keeps what the fleet did.
        ready = sim_stats(mixed["sglang"])["by_path"].get("/ready", 0)
        wait_until(
            lambda: sim_stats(mixed["sglang"])["by_path"].get("/ready", 0) >= ready + 3,
            timeout=10,
        )
        assert {n.state for n in fleet.nodes} == {NodeStatus.SLEEPING}

        fleet.wakeup()
        assert not any(sim_stats(url)["sleeping"] for url in mixed.values())
        assert sim_stats(mixed["vllm"])["by_path"].get("/wake_up") == 1
        assert sim_stats(mixed["sglang"])["by_path"].get("/resume_memory_occupation") == 1
        assert {n.state for n in fleet.nodes} == {NodeStatus.HEALTHY}
        client = fleet.client(max_retries=0)
        assert chat(client, MODEL, "awake again", max_tokens=4).choices[0].message.content


def test_a_vllm_node_put_to_sleep_behind_the_fleets_back_is_seen_and_woken_on_demand(
    start_sim: StartSim,
) -> None:
    node = start_sim("--engine", "vllm", "--fast")
    with LMFleet.attach([node.url], health_interval=0.2, wake_on_demand=True) as fleet:
        fleet.wait_ready(timeout=30)
        httpx2.post(node.url + "/sleep?level=1", timeout=5).raise_for_status()
        wait_until(lambda: fleet.nodes[0].state is NodeStatus.SLEEPING, timeout=10)
        client = fleet.client(max_retries=0)
        assert chat(client, MODEL, "wake up", max_tokens=4).choices[0].message.content
        assert sim_stats(node.url)["by_path"].get("/wake_up") == 1


def test_what_an_engine_cannot_do_is_refused_by_name(start_sim: StartSim) -> None:
    plain_vllm = start_sim("--engine", "vllm", "--fast", "--no-dev-mode")
    other = start_sim("--engine", "sglang", "--fast")
    with LMFleet.attach(
        [plain_vllm.url, other.url],
        health_interval=0.2,
        node_options={other.url: {"engine": "openai"}},
    ) as fleet:
        fleet.wait_ready(timeout=30)
        assert engines_of(fleet)[other.url] == ("openai", None)  # given, not recognised
        with pytest.raises(EngineCapabilityError, match="VLLM_SERVER_DEV_MODE=1") as caught:
            fleet.sleep(nodes=[plain_vllm.url])
        assert caught.value.engine == "vLLM" and caught.value.node == plain_vllm.url
        with pytest.raises(
            EngineCapabilityError, match=r"OpenAI-compatible server \(.*\) cannot sleep"
        ):
            fleet.sleep(nodes=[other.url])
        # Refused, not half-done: both still serve.
        assert {n.state for n in fleet.nodes} == {NodeStatus.HEALTHY}
        client = fleet.client(max_retries=0)
        assert chat(client, MODEL, "still here", max_tokens=4).choices[0].message.content


def test_a_node_put_to_sleep_before_it_was_recognised_stays_asleep(start_sim: StartSim) -> None:
    """The sleep learns the engine first (SGLang: its own route, and a `/ready` that
    cannot say "asleep", so the fleet keeps what it did), never LMDeploy's guess."""
    node = start_sim("--engine", "sglang", "--fast")
    with LMFleet.attach([node.url], health_interval=0.2) as fleet:
        fleet.sleep()  # at once: the monitor may not have probed it yet
        assert sim_stats(node.url)["sleeping"]
        assert fleet.nodes[0].engine == "sglang"
        ready = sim_stats(node.url)["by_path"].get("/ready", 0)
        wait_until(lambda: sim_stats(node.url)["by_path"].get("/ready", 0) >= ready + 3, timeout=10)
        assert fleet.nodes[0].state is NodeStatus.SLEEPING
        assert "/sleep" not in sim_stats(node.url)["by_path"]


def test_auto_sleep_and_wake_on_demand_over_every_engine(mixed: dict[str, str]) -> None:
    """Idle nodes of every engine go to sleep by themselves, each through its own
    route, and a request wakes one: the fleet's sleep is the engines' sleep."""
    with LMFleet.attach(list(mixed.values()), health_interval=0.2, auto_sleep_after=0.5) as fleet:
        wait_until(lambda: all(sim_stats(url)["sleeping"] for url in mixed.values()), timeout=20)
        wait_until(lambda: {n.state for n in fleet.nodes} == {NodeStatus.SLEEPING}, timeout=10)
        client = fleet.client(max_retries=0)
        assert chat(client, MODEL, "wake one", max_tokens=4).choices[0].message.content
        awake = [url for url in mixed.values() if not sim_stats(url)["sleeping"]]
        assert awake, "a request woke no node"


def test_one_model_under_different_names_on_different_engines_is_one_pool(
    start_sim: StartSim,
) -> None:
    """The same weights loaded by path on a vLLM node and by hub id on an SGLang node:
    an alias makes them one pool, and each node gets its own name in the body."""
    local = start_sim("--engine", "vllm", "--fast", "--model", "/data/models/internlm2_5-7b-chat")
    hub = start_sim("--engine", "sglang", "--fast", "--model", MODEL)
    names = [MODEL, "/data/models/internlm2_5-7b-chat"]
    with LMFleet.attach(
        [local.url, hub.url],
        health_interval=0.2,
        aliases={"internlm2.5-7b": names},
        strategy="round_robin",
    ) as fleet:
        fleet.wait_ready(timeout=30, min_ready=2)
        client = fleet.client(max_retries=0)
        for i in range(4):
            answer = chat(client, "internlm2.5-7b", f"alias {i}", max_tokens=2)
            assert answer.model == "internlm2.5-7b"
        assert sim_served(local.url) == 2 and sim_served(hub.url) == 2


def test_an_sglang_node_without_a_weights_backup_refuses_a_level_1_sleep(
    start_sim: StartSim,
) -> None:
    """SGLang drops the weights it releases unless started with
    --enable-weights-cpu-backup: a level-1 sleep (keep the weights) is refused by name,
    before the node is touched; level 2 (discard them) is what it can do."""
    node = start_sim("--engine", "sglang", "--fast", "--no-weights-cpu-backup")
    with LMFleet.attach([node.url], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        with pytest.raises(EngineCapabilityError, match="--enable-weights-cpu-backup"):
            fleet.sleep(level=1)
        assert not sim_stats(node.url)["sleeping"]
        assert fleet.nodes[0].state is NodeStatus.HEALTHY
        fleet.sleep(level=2)
        assert sim_stats(node.url)["sleeping"]
        assert fleet.nodes[0].state is NodeStatus.SLEEPING
