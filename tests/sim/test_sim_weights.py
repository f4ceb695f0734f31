"""Weight updates on real `lmfleet sim` processes: LMDeploy 0.18's answers per backend
and executor, the node's own accounting (/sim/stats "weights", "admin_calls"), the
update cost, the prefix cache dropped by /sleep, and the `update_weights_error` fault.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx2
import pytest
from support import BUCKET, GROUP, LOADS_WEIGHTS, SimNode, StartSim, wait_until

from lmfleet.launch.process import wait_for_port
from lmfleet.sim.weights import payload_digest
from tests.sim.conftest import chat_body

JSON = {"content-type": "application/json"}
RAY = LOADS_WEIGHTS


def post(node: SimNode, path: str, body: Any = None) -> httpx2.Response:
    return httpx2.post(node.url + path, json=body, headers=JSON, timeout=30)


def stats(node: SimNode) -> dict[str, Any]:
    response = httpx2.get(node.url + "/sim/stats", timeout=10)
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def weights(node: SimNode) -> dict[str, Any]:
    data: dict[str, Any] = stats(node)["weights"]
    return data


def start_all(start_sim: StartSim, *arg_lists: tuple[str, ...]) -> list[SimNode]:
    """Start several nodes at once (they boot in parallel), then wait for each."""
    nodes = [start_sim("--fast", *args, wait=False) for args in arg_lists]
    for node in nodes:
        wait_for_port("127.0.0.1", node.port, timeout=30, proc=node.process)
    return nodes


def test_rl_update_cycle_is_logged_in_order_with_a_digest(start_sim: StartSim) -> None:
    node = start_sim("--fast", *RAY)
    payloads: list[Any] = ["bucket-0", ["rank0-a", "rank1-a"], {"metadata": [1, 2]}]
    assert post(node, "/sleep?level=1").status_code == 200
    assert post(node, "/wakeup?tags=weights").status_code == 200
    for payload in payloads[:2]:
        answer = post(node, "/update_weights", {"serialized_named_tensors": payload})
        assert (answer.status_code, answer.json()) == (200, None)
    in_progress = weights(node)
    assert in_progress["buckets"] == 2
    assert in_progress["digest"] == payload_digest(payloads[:2])
    assert (in_progress["updates"], in_progress["last_digest"]) == (0, None)
    last = {"serialized_named_tensors": payloads[2], "finished": True}
    assert post(node, "/update_weights", last).status_code == 200
    assert post(node, "/wakeup?tags=kv_cache").status_code == 200

    data = stats(node)
    assert data["weights"] == {
        "updates": 1,
        "buckets": 0,
        "digest": "00000000",
        "last_digest": payload_digest(payloads),
        "groups": [],
        "version": 1,
        "updated_while_serving": 0,
        "weight_version": "default",
    }
    assert data["admin_calls"] == [
        "POST /sleep?level=1",
        "POST /wakeup?tags=weights",
        "POST /update_weights",
        "POST /update_weights",
        "POST /update_weights finished",
        "POST /wakeup?tags=kv_cache",
    ]
    assert data["sleeping"] is False


def test_a_finished_update_while_serving_is_counted(start_sim: StartSim) -> None:
    node = start_sim("--fast", *RAY)
    body = {"serialized_named_tensors": "x", "finished": True}
    assert post(node, "/update_weights", body).status_code == 200  # never slept
    assert post(node, "/sleep").status_code == 200
    assert post(node, "/wakeup").status_code == 200  # both tags: serving again
    assert post(node, "/update_weights", body).status_code == 200
    assert weights(node)["updated_while_serving"] == 2
    assert weights(node)["updates"] == 2


def test_update_weights_is_a_500_without_the_ray_executor(start_sim: StartSim) -> None:
    nodes = start_all(
        start_sim,
        (),  # turbomind: 0.18's TurboMind.update_params raises
        ("--backend", "pytorch"),  # LMDeploy's default executor: uni
        ("--backend", "pytorch", "--distributed-executor-backend", "mp"),
        ("--backend", "turbomind", "--distributed-executor-backend", "ray"),
    )
    for node in nodes:
        answer = post(node, "/update_weights", {"serialized_named_tensors": "x", "finished": True})
        assert answer.status_code == 500
        assert answer.headers["content-type"].startswith("text/plain")
        assert answer.text == "Internal Server Error"
        assert answer.headers.get("connection") == "close"  # uvicorn drops it after a 500
        data = stats(node)
        assert data["admin_calls"] == ["POST /update_weights finished"]
        assert (data["weights"]["buckets"], data["weights"]["updates"]) == (0, 0)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/init_weights_update_group", GROUP),
        ("/update_weights_from_distributed", BUCKET),
        ("/destroy_weights_update_group", {"group_name": "actor"}),
        ("/update_weights_from_ipc", {"zmq_handles": {}}),
    ],
)
def test_turbomind_refuses_disaggregated_routes_with_501(
    start_sim: StartSim, path: str, body: dict[str, Any]
) -> None:
    node = start_sim("--fast")
    answer = post(node, path, body)
    assert answer.status_code == 501
    assert answer.json() == {
        "message": (
            "Disaggregated weight-update endpoints require backend=\"pytorch\", got 'turbomind'."
        ),
        "type": "server_error",
        "code": 501,
        "param": None,
        "object": "error",
    }


def test_ipc_status_is_never_ready(start_sim: StartSim) -> None:
    turbomind, pytorch = start_all(start_sim, (), ("--backend", "pytorch"))
    assert post(pytorch, "/sleep").status_code == 200
    tm = httpx2.get(turbomind.url + "/update_weights_from_ipc", timeout=10).json()
    pt = httpx2.get(pytorch.url + "/update_weights_from_ipc", timeout=10).json()
    assert tm["ready"] is pt["ready"] is False
    assert tm["message"].startswith("checkpoint-engine IPC updates require backend=")
    assert (tm["backend"], tm["device_type"], tm["device_uuids"]) == ("turbomind", None, [])
    assert pt["message"].startswith("checkpoint-engine is unavailable")
    assert (pt["backend"], pt["device_type"], pt["worker_ranks"]) == ("pytorch", "cuda", [0])
    assert (pt["is_sleeping"], pt["sleeping_tags"]) == (True, ["kv_cache", "weights"])
    assert pt["device_uuids"][0].startswith("GPU-")
    refused = post(pytorch, "/update_weights_from_ipc", {"zmq_handles": {}})
    assert refused.status_code == 400 and refused.json()["success"] is False


def test_nccl_group_routes_need_ray_on_pytorch(start_sim: StartSim) -> None:
    node = start_sim("--fast", "--backend", "pytorch")
    for path, body in (
        ("/init_weights_update_group", GROUP),
        ("/update_weights_from_distributed", BUCKET),
        ("/destroy_weights_update_group", {"group_name": "actor"}),
    ):
        answer = post(node, path, body)
        assert (answer.status_code, answer.text) == (500, "Internal Server Error")
    assert weights(node)["groups"] == []


def test_weight_update_group_lifecycle(start_sim: StartSim) -> None:
    node = start_sim("--fast", *RAY)
    unknown = post(node, "/update_weights_from_distributed", BUCKET)
    assert unknown.status_code == 400
    assert unknown.json() == {
        "success": False,
        "message": "update_weights_from_distributed: rank0: group 'actor' not initialized. "
        "Call init_weights_update_group first.",
    }
    created = post(node, "/init_weights_update_group", GROUP)
    assert created.status_code == 200
    assert created.json() == {
        "success": True,
        "message": "Succeeded to initialize weights update group.",
    }
    again = post(node, "/init_weights_update_group", GROUP)
    assert (again.status_code, again.json()["success"]) == (400, False)
    assert weights(node)["groups"] == ["actor"]

    assert post(node, "/update_weights_from_distributed", BUCKET).status_code == 200
    assert weights(node)["buckets"] == 1
    done = post(node, "/update_weights_from_distributed", {**BUCKET, "finished": True})
    assert done.json() == {"success": True, "message": "Succeeded to update parameter online."}
    metadata = {k: BUCKET[k] for k in ("names", "dtypes", "shapes")}
    assert weights(node)["last_digest"] == payload_digest([metadata, metadata])
    assert weights(node)["updates"] == 1

    destroyed = post(node, "/destroy_weights_update_group", {"group_name": "actor"})
    assert destroyed.json() == {"success": True, "message": "Succeeded to destroy group 'actor'."}
    gone = post(node, "/destroy_weights_update_group", {"group_name": "actor"})
    assert gone.status_code == 400
    assert gone.json() == {
        "success": False,
        "message": "destroy_weights_update_group: rank0: group 'actor' not initialized",
    }
    data = stats(node)
    assert data["weights"]["groups"] == []
    assert data["admin_calls"] == [
        "POST /update_weights_from_distributed",
        "POST /init_weights_update_group",
        "POST /init_weights_update_group",
        "POST /update_weights_from_distributed",
        "POST /update_weights_from_distributed finished",
        "POST /destroy_weights_update_group",
        "POST /destroy_weights_update_group",
    ]


def test_a_finished_update_takes_its_cost_and_the_node_stays_responsive(
    start_sim: StartSim,
) -> None:
    seconds = 3.0
    node = start_sim("--fast", *RAY, "--weights-gb", "6", "--update-seconds-per-gb", "0.5")
    took: dict[str, float] = {}

    def finish() -> None:
        began = time.monotonic()
        body = {"serialized_named_tensors": "x", "finished": True}
        took["status"] = post(node, "/update_weights", body).status_code
        took["seconds"] = time.monotonic() - began

    worker = threading.Thread(target=finish)
    worker.start()
    # The bucket is counted, the finish not yet: read while that request is in flight.
    mid = wait_until(
        lambda: weights(node),
        seconds * 2,
        "the bucket counted before the finish",
        step=0.05,
        until=lambda w: w["buckets"] == 1,
    )
    assert mid["updates"] == 0
    assert httpx2.get(node.url + "/health", timeout=10).status_code == 200
    worker.join(60)
    assert took["status"] == 200
    assert took["seconds"] >= seconds
    assert weights(node)["updates"] == 1


def test_a_bucket_that_does_not_finish_costs_nothing_extra(start_sim: StartSim) -> None:
    node = start_sim("--fast", *RAY, "--weights-gb", "1", "--update-seconds-per-gb", "30")
    # A plain bucket is not the reload: it must answer long before the 30 s finish.
    answer = httpx2.post(
        node.url + "/update_weights",
        json={"serialized_named_tensors": "x"},
        headers=JSON,
        timeout=20,
    )
    assert answer.status_code == 200


def test_sleep_drops_the_prefix_cache(start_sim: StartSim) -> None:
    node = start_sim("--ttft-ms", "1", "--tpot-ms", "1", "--output-tokens", "2")
    prompt = "the same long system prompt, shared by every request in this test. " * 4

    def cached_after_one_request() -> int:
        before = stats(node)["cached_tokens"]
        answer = httpx2.post(node.url + "/v1/chat/completions", json=chat_body(prompt), timeout=30)
        assert answer.status_code == 200
        return int(stats(node)["cached_tokens"]) - before

    assert cached_after_one_request() == 0  # cold
    assert cached_after_one_request() > 0  # the prefix is cached
    assert post(node, "/sleep").status_code == 200
    assert post(node, "/wakeup").status_code == 200
    assert cached_after_one_request() == 0  # the KV cache went with the sleep


def test_stats_reset_keeps_the_version(start_sim: StartSim) -> None:
    node = start_sim("--fast", *RAY)
    for payload in ("v1", "v2"):
        body = {"serialized_named_tensors": payload, "finished": True}
        assert post(node, "/update_weights", body).status_code == 200
    assert post(node, "/init_weights_update_group", GROUP).status_code == 200
    assert post(node, "/update_weights", {"serialized_named_tensors": "v3"}).status_code == 200
    reset = httpx2.post(node.url + "/sim/stats/reset", timeout=10).json()
    assert reset["weights"] == {
        "updates": 0,
        "buckets": 0,
        "digest": "00000000",
        "last_digest": payload_digest(["v2"]),  # what is loaded stays
        "groups": ["actor"],  # a real group stays open until destroyed
        "version": 2,
        "updated_while_serving": 0,
        "weight_version": "default",
    }
    assert reset["admin_calls"] == []
    body = {"serialized_named_tensors": "v3", "finished": True}
    assert post(node, "/update_weights", body).status_code == 200
    assert (weights(node)["updates"], weights(node)["version"]) == (1, 3)


def test_update_weights_error_fault(start_sim: StartSim) -> None:
    healthy, faulty = start_all(start_sim, RAY, (*RAY, "--update-weights-error", "503"))
    body = {"serialized_named_tensors": "x", "finished": True}
    assert post(healthy, "/update_weights", body).status_code == 200
    refused = post(faulty, "/update_weights", body)
    assert refused.status_code == 503
    assert refused.json()["message"] == "Injected fault (lmfleet sim)."

    faults = httpx2.post(faulty.url + "/sim/faults", json={"update_weights_error": 500}, timeout=10)
    assert faults.json()["update_weights_error"] == 500
    crashed = post(faulty, "/update_weights", body)
    assert (crashed.status_code, crashed.text) == (500, "Internal Server Error")
    assert post(faulty, "/init_weights_update_group", GROUP).status_code == 200
    assert post(faulty, "/update_weights_from_distributed", BUCKET).status_code == 500

    bad = httpx2.post(faulty.url + "/sim/faults", json={"update_weights_error": 200}, timeout=10)
    assert bad.status_code == 400
    httpx2.post(faulty.url + "/sim/faults", json={"update_weights_error": None}, timeout=10)
    assert post(faulty, "/update_weights", body).status_code == 200
    data = stats(faulty)
    assert data["errors_injected"] == 3
    assert (data["weights"]["updates"], data["weights"]["buckets"]) == (1, 0)
