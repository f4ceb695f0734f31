"""One weight update over LMDeploy, vLLM and SGLang nodes at once (`lmfleet sim
--engine`, real processes): each node slept, loaded and woken through its own
engine's routes, the payload function making each engine's bodies, one version."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import chat, sim_stats

from lmfleet import LMFleet, NodeStatus, UpdateTarget, WeightUpdateUnsupportedError
from lmfleet.sim.weights import payload_digest

ENGINES = ["lmdeploy", "vllm", "sglang"]
INFO = [
    {"names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[2, 2]], "packed": False},
    {"names": ["b"], "dtype_names": ["bfloat16"], "shapes": [[2]], "packed": False},
]
"""What a vLLM node's weight-transfer engine takes per bucket (its `update_info`)."""
BODIES: dict[str, list[object]] = {
    "lmdeploy": ["lmdeploy-0", "lmdeploy-1"],
    "vllm": list(INFO),
    "sglang": [{"serialized_named_tensors": ["sglang-0"]}, "sglang-1"],
}
CALLS = {
    "lmdeploy": [
        "POST /sleep?level=1",
        "POST /wakeup?tags=weights",
        "POST /update_weights",
        "POST /update_weights finished",
        "POST /wakeup?tags=kv_cache",
    ],
    "vllm": [
        "POST /sleep?level=1&mode=abort",
        "POST /wake_up?tags=weights",
        "POST /start_weight_update",
        "POST /update_weights",
        "POST /update_weights",
        "POST /finish_weight_update",
        "POST /wake_up?tags=kv_cache",
    ],
    "sglang": [
        "POST /release_memory_occupation",
        "POST /resume_memory_occupation",  # the weights
        "POST /update_weights_from_tensor",
        "POST /update_weights_from_tensor",
        "POST /resume_memory_occupation",  # the KV cache and CUDA graphs
    ],
}


@pytest.fixture
def fleet() -> Iterator[LMFleet]:
    with LMFleet.simulate(
        nodes=3,
        engine=ENGINES,
        weight_updates=True,
        sim_args=["--fast"],
        health_interval=0.2,
    ) as fleet:
        fleet.wait_ready(timeout=60)
        yield fleet


def test_one_update_reaches_every_engine_through_its_own_routes(fleet: LMFleet) -> None:
    seen: dict[str, str | None] = {}

    def payload(node: UpdateTarget) -> list[object]:
        seen[node.url] = node.engine
        assert node.engine is not None
        return BODIES[node.engine]

    with fleet.weight_update(version=3) as update:
        assert all(n.state is NodeStatus.SLEEPING for n in fleet.nodes)
        update.push(payload)
    assert update.result is not None and update.result.ok, update.result
    engines = {n.url: n.engine for n in fleet.nodes}
    assert seen == engines and sorted(seen.values()) == sorted(ENGINES)
    for url, engine in engines.items():
        stats = sim_stats(url)
        assert engine is not None
        assert stats["admin_calls"] == CALLS[engine], engine
        ledger = stats["weights"]
        assert ledger["updates"] == 1 and ledger["updated_while_serving"] == 0, engine
        sent = {"sglang": ["sglang-0", "sglang-1"]}.get(engine, BODIES[engine])
        assert ledger["last_digest"] == payload_digest(sent), engine
        if engine != "lmdeploy":  # the version the engine itself now reports
            assert ledger["weight_version"] == "3", engine
    assert {n.weight_version for n in fleet.nodes} == {3}
    assert {n.state for n in fleet.nodes} == {NodeStatus.HEALTHY}
    client = fleet.client(max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=fleet.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert raw.headers["x-lmfleet-weight-version"] == "3"
    assert chat(client, fleet.model, "again", max_tokens=2).choices[0].message.content


def test_a_pinned_batch_stays_on_its_version_across_engines(fleet: LMFleet) -> None:
    """Half the engines updated: a batch pinned to the current version is served by
    the updated nodes only, whatever their engine; an unpinned one by all."""
    by_engine = {n.engine: n.url for n in fleet.nodes}
    updated = [by_engine["vllm"], by_engine["sglang"]]
    result = fleet.update_weights(
        lambda node: BODIES[str(node.engine)], version=2, nodes=updated, allow_mixed=True
    )
    assert result.ok and sorted(result.updated) == sorted(updated)
    old = {n.url: sim_stats(n.url)["completed"] for n in fleet.nodes}
    prompts = [[{"role": "user", "content": f"p{i}"}] for i in range(12)]
    batch = fleet.chat_many(prompts, weight_version="current", max_tokens=2, progress=False)
    assert len(batch.ok) == 12
    done = {n.url: sim_stats(n.url)["completed"] - old[n.url] for n in fleet.nodes}
    assert done[by_engine["lmdeploy"]] == 0 and sum(done.values()) == 12
    assert {segments[0][2] for segments in batch.weight_versions} == {2}
    unpinned = fleet.chat_many(prompts, max_tokens=2, progress=False, concurrency=12)
    assert {segments[0][2] for segments in unpinned.weight_versions if segments} == {0, 2}


def test_the_nccl_helpers_drive_lmdeploy_and_sglang_and_refuse_vllm_by_name(
    fleet: LMFleet,
) -> None:
    by_engine = {str(n.engine): n.url for n in fleet.nodes}
    nccl = [by_engine["lmdeploy"], by_engine["sglang"]]
    buckets = [{"names": [f"w{i}"], "dtypes": ["bfloat16"], "shapes": [[2, 2]]} for i in range(2)]
    with fleet.weight_update(version=4, nodes=nccl) as update:
        offsets = update.init_group("127.0.0.1", 29500)
        assert sorted(offsets.values()) == [1, 2]
        update.update_from_distributed(buckets, lambda bucket: None)
        update.destroy_group()
    assert update.result is not None and update.result.ok
    for url in nccl:
        ledger = sim_stats(url)["weights"]
        assert (ledger["updates"], ledger["groups"]) == (1, []), url
        assert ledger["last_digest"] == payload_digest(buckets)
    assert sim_stats(by_engine["sglang"])["weights"]["weight_version"] == "4"
    assert {n.weight_version for n in fleet.nodes if n.url in nccl} == {4}

    refused = pytest.raises(WeightUpdateUnsupportedError, match="vLLM node")
    with refused as caught, fleet.weight_update(version=5) as update:
        update.init_group("127.0.0.1", 29501)
    assert by_engine["vllm"] in str(caught.value)
    assert all(sim_stats(url)["weights"]["groups"] == [] for url in by_engine.values())
