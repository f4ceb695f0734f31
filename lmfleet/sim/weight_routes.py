"""LMDeploy 0.18's weight-update routes, with the answers its engines give.

Read from lmdeploy 0.18.0 (`serve/openai/endpoints/management.py`, the PyTorch
`Engine`, its executors and model agent, `turbomind/turbomind.py`):

- `POST /update_weights` (UpdateParamsRequest) calls `engine.update_params`. Only
  the PyTorch engine's Ray executor implements it; the uni and mp executors raise
  NotImplementedError, and TurboMind's `update_params` raises too (0.18 never sets
  the `_update_params_que` / `_export_iter` it uses). An exception escaping the
  route is FastAPI's 500 `text/plain` "Internal Server Error".
- `/init_weights_update_group`, `/update_weights_from_distributed`,
  `/destroy_weights_update_group` and `POST /update_weights_from_ipc` answer 501
  with LMDeploy's error body unless `backend == "pytorch"`; then the engine runs them
  one at a time. The NCCL group routes exist on the Ray executor only (others: 500);
  its answers are `{"success", "message"}`, 400 on failure, each failure message
  prefixed `"<op>: rank0: "` as RayExecutor reduces its workers' answers.
- `GET /update_weights_from_ipc` reports checkpoint-engine readiness. The emulated
  GPU worker has no checkpoint-engine installed, so it is never ready (and POST
  fails with the worker's import error), as on a node without that package.

The simulator cannot receive tensors or join a NCCL group: it validates, records
(weights.py) and answers. A finished update takes `weights_gb * update_seconds_per_gb`
seconds of `asyncio.sleep`, so the node keeps serving other routes meanwhile.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lmfleet.sim import asgi
from lmfleet.sim.node import NodeRuntime
from lmfleet.sim.protocol import dumps, error_body
from lmfleet.sim.routes import BadRequest, Handler, json_body
from lmfleet.sim.weights import Group, call_line

INTERNAL_ERROR = b"Internal Server Error"
PLAIN_TEXT = b"text/plain; charset=utf-8"
IPC_NEEDS_PYTORCH_CUDA = (
    'checkpoint-engine IPC updates require backend="pytorch" and device_type="cuda".'
)
CHECKPOINT_ENGINE_MISSING = (
    "checkpoint-engine is unavailable; install 'checkpoint-engine==0.4.2': "
    "No module named 'checkpoint_engine'"
)
IPC_FAILED = (
    "Failed to update weights from checkpoint-engine IPC: No module named 'checkpoint_engine'. "
    "The model weights may be partially updated; discard this instance and reload it."
)
INJECTED = "Injected fault (lmfleet sim)."


# -- request bodies: LMDeploy's pydantic models, so that errors read the same ----


class UpdateParamsRequest(BaseModel):
    serialized_named_tensors: str | list[str] | dict[Any, Any]
    load_format: str | None = None
    finished: bool = False


class UpdateWeightsFromIPCRequest(BaseModel):
    zmq_handles: dict[str, str]


class InitWeightsUpdateGroupRequest(BaseModel):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str = "nccl"


class UpdateWeightsFromDistributedRequest(BaseModel):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str
    load_format: str | None = None
    finished: bool = False
    weight_version: str | None = None
    """SGLang's: the version its last bucket names (LMDeploy ignores the field)."""


class DestroyWeightsUpdateGroupRequest(BaseModel):
    group_name: str


Body = TypeVar("Body", bound=BaseModel)


async def parse(model: type[Body], scope: asgi.Scope, receive: asgi.Receive) -> Body:
    """The JSON body validated as FastAPI does: Content-Type first, then the model;
    the first pydantic error becomes LMDeploy's `"<loc>: <msg>"` 400."""
    body = await json_body(scope, receive)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        raise BadRequest(f"{loc}: {first['msg']}" if loc else first["msg"]) from None


# -- answers -----------------------------------------------------------------------


async def send_internal_error(send: asgi.Send) -> None:
    """FastAPI's answer to an exception escaping a route; uvicorn then drops the
    connection, which `connection: close` reproduces."""
    headers = [
        (b"content-length", str(len(INTERNAL_ERROR)).encode()),
        (b"content-type", PLAIN_TEXT),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": INTERNAL_ERROR})


async def send_outcome(send: asgi.Send, op: str, ok: bool, message: str) -> None:
    """The engine's `(success, message)` as the route renders it (200 or 400);
    a failure worded as RayExecutor reduces its single worker's answer."""
    if not ok:
        message = f"{op}: rank0: {message}"
    await asgi.send_json(send, 200 if ok else 400, {"success": ok, "message": message})


async def injected_failure(rt: NodeRuntime, send: asgi.Send) -> bool:
    """Answer with the `update_weights_error` fault's status when it is set."""
    status = rt.faults.update_weights_error
    if status is None:
        return False
    rt.stats.errors_injected += 1
    if status == 500:
        await send_internal_error(send)
    else:
        await asgi.send_error(send, status, INJECTED)
    return True


async def refused_disaggregated(rt: NodeRuntime, send: asgi.Send) -> bool:
    """LMDeploy's 501 unless the backend is pytorch (`_check_pytorch_backend_...`)."""
    backend = rt.options.backend
    if backend == "pytorch" or rt.options.engine != "lmdeploy":
        return False
    message = f'Disaggregated weight-update endpoints require backend="pytorch", got {backend!r}.'
    await asgi.send_bytes(send, 501, dumps(error_body(501, message)))
    return True


async def refused_by_executor(rt: NodeRuntime, send: asgi.Send) -> bool:
    """500 where LMDeploy's executor raises NotImplementedError (anything but Ray);
    SGLang's group routes need no such flag."""
    if rt.options.engine != "lmdeploy" or (
        rt.options.backend == "pytorch" and rt.options.executor == "ray"
    ):
        return False
    await send_internal_error(send)
    return True


async def finish_update(rt: NodeRuntime, weight_version: str | None = None) -> None:
    """Reload cost, then the buckets so far become the node's weights."""
    if rt.options.update_seconds:
        await asyncio.sleep(rt.options.update_seconds)
    rt.weights.finish(serving=rt.serving, weight_version=weight_version)


# -- routes ------------------------------------------------------------------------


async def update_weights(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    request = await parse(UpdateParamsRequest, scope, receive)
    rt.weights.record_call(call_line(scope, "finished" if request.finished else ""))
    if await injected_failure(rt, send) or await refused_by_executor(rt, send):
        return
    rt.weights.add_bucket(request.serialized_named_tensors)
    if request.finished:
        await finish_update(rt)
    await asgi.send_json(send, 200, None)


def worker_uuid(rt: NodeRuntime) -> str:
    """A stable fake `GPU-<uuid>` for the node's one emulated worker."""
    return f"GPU-{uuid.uuid5(uuid.NAMESPACE_URL, f'lmfleet-sim:{rt.options.port}')}"


async def ipc_status(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    """UpdateWeightsFromIPCStatus: never ready (the worker lacks checkpoint-engine)."""
    pytorch = rt.options.backend == "pytorch"
    await asgi.send_json(
        send,
        200,
        {
            "ready": False,
            "message": CHECKPOINT_ENGINE_MISSING if pytorch else IPC_NEEDS_PYTORCH_CUDA,
            "backend": rt.options.backend,
            "device_type": "cuda" if pytorch else None,  # TurbomindEngineConfig has none
            "checkpoint_engine_version": None,
            "is_sleeping": rt.is_sleeping,
            "sleeping_tags": sorted(rt.sleeping_tags),
            "device_uuids": [worker_uuid(rt)] if pytorch else [],
            "worker_ranks": [0] if pytorch else [],
        },
    )


async def update_weights_from_ipc(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    await parse(UpdateWeightsFromIPCRequest, scope, receive)
    rt.weights.record_call(call_line(scope))
    if await refused_disaggregated(rt, send):
        return
    message = IPC_FAILED  # the worker's import of checkpoint_engine.worker fails
    if rt.options.executor != "uni":  # mp and ray reduce their workers' answers
        message = f"update_weights_from_ipc: rank0: {message}"
    await asgi.send_json(send, 400, {"success": False, "message": message})


async def init_weights_update_group(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    request = await parse(InitWeightsUpdateGroupRequest, scope, receive)
    rt.weights.record_call(call_line(scope))
    if await refused_disaggregated(rt, send) or await refused_by_executor(rt, send):
        return
    groups, name = rt.weights.groups, request.group_name
    async with rt.weights.lock:
        if not name:
            ok, message = False, "group_name cannot be empty"
        elif name in groups:
            ok, message = False, f"group {name!r} already initialized"
        else:
            groups[name] = Group(
                name=name,
                world_size=request.world_size,
                rank_offset=request.rank_offset,
                master_address=request.master_address,
                master_port=request.master_port,
                backend=request.backend,
            )
            ok, message = True, "Succeeded to initialize weights update group."
    await send_outcome(send, "init_weights_update_group", ok, message)


async def update_weights_from_distributed(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    request = await parse(UpdateWeightsFromDistributedRequest, scope, receive)
    rt.weights.record_call(call_line(scope, "finished" if request.finished else ""))
    if await injected_failure(rt, send) or await refused_disaggregated(rt, send):
        return
    if await refused_by_executor(rt, send):
        return
    name = request.group_name
    async with rt.weights.lock:
        if name not in rt.weights.groups:
            ok = False
            message = f"group {name!r} not initialized. Call init_weights_update_group first."
        else:
            rt.weights.add_bucket(request.model_dump(include={"names", "dtypes", "shapes"}))
            # LMDeploy finishes on `finished`; SGLang loads each bucket as it comes,
            # and lmfleet names the version on the last one.
            last = request.finished if rt.options.engine == "lmdeploy" else request.weight_version
            if last:
                await finish_update(rt, request.weight_version)
            ok, message = True, "Succeeded to update parameter online."
    await send_outcome(send, "update_weights_from_distributed", ok, message)


async def destroy_weights_update_group(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    request = await parse(DestroyWeightsUpdateGroupRequest, scope, receive)
    rt.weights.record_call(call_line(scope))
    if await refused_disaggregated(rt, send) or await refused_by_executor(rt, send):
        return
    name = request.group_name
    async with rt.weights.lock:
        if rt.weights.groups.pop(name, None) is None:
            ok, message = False, f"group {name!r} not initialized"
        else:
            ok, message = True, f"Succeeded to destroy group {name!r}."
    await send_outcome(send, "destroy_weights_update_group", ok, message)


GROUP_ROUTES: dict[str, dict[str, Handler]] = {
    "/init_weights_update_group": {"POST": init_weights_update_group},
    "/update_weights_from_distributed": {"POST": update_weights_from_distributed},
    "/destroy_weights_update_group": {"POST": destroy_weights_update_group},
}
"""The NCCL group routes: LMDeploy's, and SGLang's under the same names and bodies."""

ROUTES: dict[str, dict[str, Handler]] = {
    "/update_weights": {"POST": update_weights},
    "/update_weights_from_ipc": {"GET": ipc_status, "POST": update_weights_from_ipc},
    **GROUP_ROUTES,
}
