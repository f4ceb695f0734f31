"""Weight updates of LMDeploy 0.18 (PyTorch) against the simulator.

- default executor (the session pair): checkpoint-engine readiness at each sleep
  step, and /wakeup's rule that a call naming a tag that is not asleep wakes nothing;
- Ray executor (a second pair, started here): the answers of a weight update that
  is accepted, and of the NCCL group lifecycle. The peer's stub engine bookkeeps
  groups as the model agent does; what this checks is LMDeploy's routes around it
  (status codes, `null` and `{"success", "message"}` bodies, the 501/500 paths).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from conformance.peer_support import API_KEY, Server, started_pair
from support import BUCKET, GROUP

JSON = {"content-type": "application/json"}
KEY = {"authorization": f"Bearer {API_KEY}"}
# Everything GET /update_weights_from_ipc reports but the device UUIDs (values differ).
IPC_FIELDS = (
    "ready",
    "message",
    "backend",
    "device_type",
    "checkpoint_engine_version",
    "is_sleeping",
    "sleeping_tags",
    "worker_ranks",
)


def ipc_status(client: httpx2.Client, url: str) -> dict[str, Any]:
    response = client.get(url + "/update_weights_from_ipc", headers=KEY)
    body: dict[str, Any] = response.json()
    return {"status": response.status_code, **{k: body.get(k, "<missing>") for k in IPC_FIELDS}}


def lifecycle_script(url: str) -> list[tuple[str, Any]]:
    """Sleep, wake weights, a wakeup naming the awake `weights` again (a no-op in
    LMDeploy), then wake kv_cache: what the node says after each step."""
    steps: list[tuple[str, Any]] = []
    with httpx2.Client(timeout=30) as c:

        def post(path: str) -> int:
            return c.post(url + path, headers={**JSON, **KEY}).status_code

        def sleeping() -> Any:
            return c.get(url + "/is_sleeping", headers=KEY).json()

        steps.append(("awake", ipc_status(c, url)))
        steps.append(("sleep", post("/sleep?level=1")))
        steps.append(("asleep", ipc_status(c, url)))
        steps.append(("wake weights", post("/wakeup?tags=weights")))
        steps.append(("weights awake", ipc_status(c, url)))
        steps.append(("wake both", post("/wakeup?tags=weights&tags=kv_cache")))
        steps.append(("after wake both", sleeping()))
        steps.append(("wake unknown tag", post("/wakeup?tags=kv_cache&tags=nope")))
        steps.append(("after unknown tag", sleeping()))
        steps.append(("wake kv_cache", post("/wakeup?tags=kv_cache")))
        steps.append(("all awake", ipc_status(c, url)))
        steps.append(("wake again", post("/wakeup")))
        steps.append(("still awake", sleeping()))
    return steps


def test_weight_lifecycle_matches(pair) -> None:
    real = lifecycle_script(pair.real.url)
    sim = lifecycle_script(pair.sim.url)
    assert dict(real)["after wake both"] == {"is_sleeping": True}  # LMDeploy's rule
    problems = [
        f"{name}: real {a!r}, sim {b!r}"
        for (name, a), (_, b) in zip(real, sim, strict=True)
        if a != b
    ]
    assert not problems, "\n".join(problems)


RAY = ("--distributed-executor-backend", "ray")
RAY_SCRIPT: list[tuple[str, Any]] = [
    ("/update_weights", {"serialized_named_tensors": "AAAA"}),
    ("/update_weights", {"serialized_named_tensors": ["AAAA"], "finished": True}),
    ("/update_weights_from_distributed", BUCKET),
    ("/init_weights_update_group", GROUP),
    ("/init_weights_update_group", GROUP),
    ("/init_weights_update_group", {**GROUP, "group_name": ""}),
    ("/update_weights_from_distributed", BUCKET),
    ("/update_weights_from_distributed", {**BUCKET, "names": [], "finished": True}),
    ("/destroy_weights_update_group", {"group_name": "actor"}),
    ("/destroy_weights_update_group", {"group_name": "actor"}),
    ("/update_weights_from_distributed", BUCKET),
    ("/update_weights_from_ipc", {"zmq_handles": {}}),
]


@pytest.fixture(scope="module")
def ray_pair(peer_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    """A peer and a sim, both `--backend pytorch --distributed-executor-backend ray`."""
    logs = tmp_path_factory.mktemp("ray-logs")
    with started_pair(peer_model, logs, *RAY) as servers:
        yield servers


def ray_script(url: str) -> list[tuple[str, int, str, str]]:
    out = []
    with httpx2.Client(timeout=30) as c:
        for path, body in RAY_SCRIPT:
            response = c.post(url + path, json=body)
            media = response.headers.get("content-type", "").split(";")[0]
            out.append((path, response.status_code, media, response.text))
    return out


def test_ray_weight_updates_match(ray_pair: list[Server]) -> None:
    real, sim = (ray_script(server.url) for server in ray_pair)
    assert real[0][1:] == (200, "application/json", "null")  # accepted: the route's `null`
    problems = [f"real {a!r}\nsim  {b!r}" for a, b in zip(real, sim, strict=True) if a != b]
    assert not problems, "\n".join(problems)
