"""SGLang's `/generate` and vLLM's `/inference/v1/generate` through the fleet
(transport/token_dialects.py), over real sims of each engine: each request reaches
only nodes of the engine whose body it is, a generation cut by a killed node
continues on another node of its engine equal token for token to the
uninterrupted one, and one generation is aborted by the fleet's request id through
the engine's own abort route."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from support import (
    GENERATING,
    SimNode,
    StartSim,
    alive,
    in_thread,
    sim_stats,
    sse_events,
    streaming_node,
    wait_until,
)

from lmfleet import LMFleet
from lmfleet.config import FleetOptions, RoutingOptions

PROMPT = [11, 12, 13, 14, 15]
SLOW = GENERATING
SGLANG_BODY = {
    "input_ids": PROMPT,
    "sampling_params": {"max_new_tokens": 400, "ignore_eos": True},
}
VLLM_BODY = {"token_ids": PROMPT, "sampling_params": {"max_tokens": 400, "ignore_eos": True}}
VLLM = "/inference/v1/generate"

pytestmark = pytest.mark.xdist_group("continuation")


def _attach(nodes: list[SimNode]) -> LMFleet:
    options = FleetOptions(routing=RoutingOptions(wait_for_node=10.0))
    fleet = LMFleet.attach([n.url for n in nodes], options=options, health_interval=0.2)
    fleet.wait_ready(timeout=30)
    wait_until(lambda: all(n.engine for n in fleet.nodes), 10, "every node recognised")
    return fleet


def _paths(node: SimNode) -> dict[str, int]:
    return dict(sim_stats(node.url)["by_path"])


def test_each_token_route_reaches_only_its_engines_nodes(start_sim: StartSim) -> None:
    nodes = {e: start_sim("--engine", e, "--fast") for e in ("lmdeploy", "sglang", "vllm")}
    with _attach(list(nodes.values())) as fleet:
        http = fleet.client(max_retries=0)._client
        for _ in range(4):
            lmdeploy = http.post(
                "http://lmfleet.invalid/generate", json={"input_ids": PROMPT, "max_tokens": 3}
            )
            assert lmdeploy.status_code == 200 and len(lmdeploy.json()["output_ids"]) == 3
            sglang = http.post(
                "http://lmfleet.invalid/generate",
                json={"text": "hi", "sampling_params": {"max_new_tokens": 3}},
            )
            assert sglang.status_code == 200, sglang.text
            assert sglang.json()["meta_info"]["completion_tokens"] == 3
            vllm = http.post(
                "http://lmfleet.invalid" + VLLM,
                json={"token_ids": PROMPT, "sampling_params": {"max_tokens": 3}},
            )
            assert vllm.status_code == 200, vllm.text
            assert len(vllm.json()["choices"][0]["token_ids"]) == 3
    counts = {e: _paths(n) for e, n in nodes.items()}
    assert counts["lmdeploy"].get("/generate") == 4
    assert counts["sglang"].get("/generate") == 4
    assert counts["vllm"].get(VLLM) == 4 and "/generate" not in counts["vllm"]


def test_ids_alone_go_to_the_engine_the_fleet_runs(start_sim: StartSim) -> None:
    nodes = [start_sim("--engine", e, "--fast") for e in ("sglang", "vllm")]
    with _attach(nodes) as fleet:
        http = fleet.client(max_retries=0)._client
        answer = http.post("http://lmfleet.invalid/generate", json={"input_ids": PROMPT})
        assert answer.status_code == 200, answer.text
        # vLLM and SGLang score an echoed prompt themselves: the request goes as it came.
        echo = {"prompt": "a b", "echo": True, "logprobs": 1, "max_tokens": 1}
        for _ in range(2):
            scored = http.post(
                "http://lmfleet.invalid/v1/completions", json=echo | {"model": fleet.model}
            )
            assert scored.status_code == 200, scored.text
    sglang, vllm = (_paths(n) for n in nodes)
    assert sglang.get("/generate") == 1  # SGLang's: LMDeploy's shape, no LMDeploy node
    assert sglang.get("/v1/completions", 0) + vllm.get("/v1/completions", 0) == 2


def test_through_the_proxy_too(
    start_sim: StartSim, serve_fleet: Callable[..., tuple[LMFleet, Any]]
) -> None:
    nodes = [start_sim("--engine", e, "--fast") for e in ("sglang", "vllm")]
    _, server = serve_fleet([n.url for n in nodes])
    with httpx2.Client(base_url=server.url, timeout=30) as proxy:
        vllm = proxy.post(VLLM, json={"token_ids": PROMPT, "sampling_params": {"max_tokens": 3}})
        assert vllm.status_code == 200, vllm.text
        assert len(vllm.json()["choices"][0]["token_ids"]) == 3
        sglang = proxy.post(
            "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 5}}
        )
        assert sglang.status_code == 200, sglang.text
        assert sglang.json()["meta_info"]["completion_tokens"] == 5
    assert _paths(nodes[0]).get("/generate") == 1 and _paths(nodes[1]).get(VLLM) == 1


def test_an_sglang_stream_cut_by_a_killed_node_continues_on_the_other(
    start_sim: StartSim,
) -> None:
    sglang = [start_sim("--engine", "sglang", *SLOW) for _ in range(2)]
    lmdeploy = start_sim(*SLOW)
    expected = httpx2.post(sglang[0].url + "/generate", json=SGLANG_BODY, timeout=30).json()
    with _attach([*sglang, lmdeploy]) as fleet:
        http = fleet.client(max_retries=0)._client

        def stream() -> list[dict[str, Any]]:
            body = {**SGLANG_BODY, "stream": True}
            with http.stream("POST", "http://lmfleet.invalid/generate", json=body) as answer:
                assert answer.status_code == 200
                return sse_events(answer.iter_lines())

        thread, out = in_thread(stream)
        streaming_node(sglang).process.kill()
        thread.join(60)
    events = out[0]
    last = events[-1]
    # SGLang's events are cumulative: the caller's stay so across the two nodes.
    assert last["output_ids"] == expected["output_ids"] and last["text"] == expected["text"]
    assert all(len(e["output_ids"]) == e["meta_info"]["completion_tokens"] for e in events), (
        "an event that is not cumulative"
    )
    assert last["meta_info"]["finish_reason"] == {"type": "length"}
    assert last["meta_info"]["completion_tokens"] == 400
    assert last["meta_info"]["prompt_tokens"] == len(PROMPT)
    assert last["meta_info"]["weight_versions"] == [[0, 400, 0]]
    survivor = next(n for n in sglang if alive(n))
    assert _paths(survivor).get("/generate", 0) >= 1
    assert "/generate" not in _paths(lmdeploy)  # never continued on another engine


def test_a_vllm_generation_survives_a_killed_node_streamed_and_not(start_sim: StartSim) -> None:
    nodes = [start_sim("--engine", "vllm", *SLOW) for _ in range(3)]
    expected = httpx2.post(nodes[0].url + VLLM, json=VLLM_BODY, timeout=30).json()
    whole = expected["choices"][0]["token_ids"]
    with _attach(nodes) as fleet:
        http = fleet.client(max_retries=0)._client
        thread, out = in_thread(
            lambda: http.post("http://lmfleet.invalid" + VLLM, json=VLLM_BODY, timeout=60)
        )
        streaming_node(nodes).process.kill()  # the fleet streams it from the node regardless
        thread.join(60)
        answer = out[0].json()
        assert answer["choices"][0]["token_ids"] == whole
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 400
        assert answer["choices"][0]["weight_versions"] == [{"version": "0", "start": 0, "end": 400}]

        def stream() -> list[dict[str, Any]]:
            body = {**VLLM_BODY, "stream": True}
            with http.stream("POST", "http://lmfleet.invalid" + VLLM, json=body) as reply:
                return sse_events(reply.iter_lines())

        thread, out = in_thread(stream)
        streaming_node([n for n in nodes if alive(n)]).process.kill()
        thread.join(60)
    streamed = [t for e in out[0] for c in e["choices"] for t in c["token_ids"]]
    assert streamed == whole
    assert out[0][-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_one_generation_is_aborted_by_its_request_id(start_sim: StartSim, engine: str) -> None:
    node = start_sim("--engine", engine, *SLOW)
    path, body = ("/generate", SGLANG_BODY) if engine == "sglang" else (VLLM, VLLM_BODY)
    with _attach([node]) as fleet:
        http = fleet.client(max_retries=0)._client
        ids: list[str] = []
        head = threading.Event()

        def stream() -> list[dict[str, Any]]:
            with http.stream(
                "POST", "http://lmfleet.invalid" + path, json={**body, "stream": True}
            ) as reply:
                ids.append(reply.headers["x-lmfleet-request-id"])
                head.set()
                return sse_events(reply.iter_lines())

        thread, out = in_thread(stream)
        assert head.wait(20)
        wait_until(lambda: sim_stats(node.url)["streaming"] == 1, 20)
        assert fleet.abort(ids[0]) == [node.url]
        thread.join(60)
    last = out[0][-1]
    if engine == "sglang":
        assert last["meta_info"]["finish_reason"] == {"type": "abort"}
        assert 0 < len(last["output_ids"]) < 400
    else:
        assert last["choices"][0]["finish_reason"] == "abort"
        assert 0 < sum(len(e["choices"][0]["token_ids"]) for e in out[0]) < 400
    abort_path = "/abort_request" if engine == "sglang" else "/abort_requests"
    assert _paths(node).get(abort_path) == 1


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_a_weight_update_cuts_and_continues_the_generation(
    start_sim: StartSim, engine: str
) -> None:
    nodes = [start_sim("--engine", engine, *SLOW) for _ in range(2)]
    path, body = ("/generate", SGLANG_BODY) if engine == "sglang" else (VLLM, VLLM_BODY)
    bucket = {"names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[2]], "packed": False}
    payload: object = "same" if engine == "sglang" else [bucket]  # vLLM's `update_info`
    with _attach(nodes) as fleet:
        http = fleet.client(max_retries=0)._client
        thread, out = in_thread(
            lambda: http.post("http://lmfleet.invalid" + path, json=body, timeout=60)
        )
        streaming_node(nodes)
        result = fleet.update_weights(payload, version=1, in_flight="continue")
        assert result.ok, result
        assert thread.is_alive()  # the update did not wait for the generation
        thread.join(60)
    answer = out[0].json()
    if engine == "sglang":
        segments = answer["meta_info"]["weight_versions"]
        assert len(answer["output_ids"]) == 400
    else:
        segments = [
            [s["start"], s["end"], int(s["version"])]
            for s in answer["choices"][0]["weight_versions"]
        ]
        assert len(answer["choices"][0]["token_ids"]) == 400
    assert [s[2] for s in segments] == [0, 1] and segments[-1][1] == 400
