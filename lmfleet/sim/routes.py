"""Handlers of every non-inference route: LMDeploy's management and auxiliary
endpoints, and the simulator-only admin routes under /sim.

Each handler is `async (rt, scope, receive, send) -> None`; the app maps
(method, path) to them with one dict lookup.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import zlib
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from lmfleet.sim import asgi
from lmfleet.sim.engine import count_tokens
from lmfleet.sim.logprobs import text_ids
from lmfleet.sim.node import NodeRuntime
from lmfleet.sim.protocol import (
    NOT_A_DICT,
    RequestError,
    decode_json,
    dumps,
    model_list,
    new_id,
    usage,
)
from lmfleet.sim.weights import call_line

Handler = Callable[[NodeRuntime, asgi.Scope, asgi.Receive, asgi.Send], Awaitable[None]]

NOT_JSON = "Unsupported Media Type: Only 'application/json' is allowed"
TERMINATE_REFUSED = (
    "The server can not be terminated. Please add --allow-terminate-by-client when start the "
    "server."
)
ABORT_DISABLED = (
    b"This server does not support abort requests. Enable with --enable-abort-handling flag."
)


class BadRequest(Exception):
    """A body LMDeploy's request validation would refuse (rendered as a 400)."""


async def json_body(scope: asgi.Scope, receive: asgi.Receive, *, model: bool = True) -> Any:
    """The decoded body of a route that requires `Content-Type: application/json`.

    `model`: the route takes a pydantic body (so an empty body is "Field required");
    /sleep and /wakeup take none and ignore whatever is sent.
    """
    if not asgi.is_json(scope):
        raise BadRequest(NOT_JSON)
    if not model:
        await asgi.read_body(receive)
        return None
    return await object_body(receive)


async def object_body(receive: asgi.Receive) -> dict[str, Any]:
    """The body as a JSON object, or LMDeploy's 400 message for what is not one."""
    raw = await asgi.read_body(receive)
    try:
        body = decode_json(raw)
    except RequestError as exc:
        raise BadRequest(exc.message) from exc
    if not isinstance(body, dict):
        raise BadRequest(NOT_A_DICT)
    return body


def query(scope: asgi.Scope) -> dict[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


class Hung(Exception):
    """The client gave up on a request the node was told to hang on."""


async def hang_forever(receive: asgi.Receive) -> None:
    """Accept and never answer (fault injection) until the client disconnects.

    Waiting on `receive()` rather than forever lets the server shut down at once
    once the client has gone, instead of waiting out its graceful timeout.
    """
    while (await receive())["type"] != "http.disconnect":
        pass
    raise Hung


async def health(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    if rt.faults.hang_health:
        await hang_forever(receive)
    snapshot = rt.health()
    code = 200 if snapshot["status"] in ("healthy", "sleeping") else 503
    await asgi.send_json(send, code, snapshot)


async def models(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    if rt.faults.models_delay:
        await asyncio.sleep(rt.faults.models_delay)
    await asgi.send_json(send, 200, model_list(rt.model_name, rt.created, rt.options.engine))
    rt.stats.models_answered += 1


async def sleep(rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
    await json_body(scope, receive, model=False)
    rt.weights.record_call(call_line(scope))
    raw = query(scope).get("level", ["1"])[-1]
    try:
        level = int(raw)
    except ValueError:
        await asgi.send_error(send, 400, 'The "level" query parameter must be an integer.')
        return
    if level not in (1, 2):
        await asgi.send_error(send, 400, 'The "level" query parameter must be 1 or 2.')
        return
    rt.sleep(level)
    await asgi.send_bytes(send, 200, b"", None)


async def wakeup(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    await json_body(scope, receive, model=False)
    rt.weights.record_call(call_line(scope))
    if rt.faults.wakeup_error is not None:  # the node stays asleep
        rt.stats.errors_injected += 1
        await asgi.send_error(send, rt.faults.wakeup_error, "injected wakeup failure")
        return
    rt.wakeup(query(scope).get("tags", []))
    await asgi.send_bytes(send, 200, b"", None)


async def is_sleeping(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    await asgi.send_json(send, 200, {"is_sleeping": rt.is_sleeping})


async def abort_request(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    body = await object_body(receive)
    if not rt.options.enable_abort_handling:
        # LMDeploy's Response(content=str) carries no Content-Type at all.
        await asgi.send_bytes(send, 501, ABORT_DISABLED, None)
        return
    if body.get("abort_all"):
        rt.abort_all()
    else:
        session_id = body.get("session_id", -1)
        if not rt.abort_session(session_id):
            await asgi.send_error(send, 400, f"Session {session_id} not found.")
            return
    await asgi.send_bytes(send, 200, b"", None)


async def terminate(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    if not rt.options.allow_terminate_by_client:
        await asgi.send_error(send, 400, TERMINATE_REFUSED)
        return
    await asgi.send_bytes(send, 200, b"", None)
    # After the answer is out: uvicorn turns SIGTERM into a clean shutdown.
    asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)


async def encode(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    body = await json_body(scope, receive)
    text = body.get("input")
    add_bos = bool(body.get("add_bos", True))
    if isinstance(text, str):
        ids = text_ids(text, add_bos)
        await asgi.send_json(send, 200, {"input_ids": ids, "length": len(ids)})
    elif isinstance(text, list) and all(isinstance(t, str) for t in text):
        batch = [text_ids(t, add_bos) for t in text]
        await asgi.send_json(send, 200, {"input_ids": batch, "length": [len(b) for b in batch]})
    elif text is None:
        raise BadRequest("input: Field required")
    else:
        raise BadRequest("input.str: Input should be a valid string")


async def pooling(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    body = await json_body(scope, receive)
    data = body.get("input")
    if isinstance(data, str):
        inputs: list[Any] = [data]
    elif isinstance(data, list):
        if not data:
            await asgi.send_error(send, 400, "Input list cannot be empty.")
            return
        inputs = [data] if isinstance(data[0], int) else data
    else:
        await asgi.send_error(send, 400, "Input must be a string or a list.")
        return
    texts = [x if isinstance(x, str) else " ".join(map(str, x)) for x in inputs]
    prompt_tokens = sum(count_tokens(x) if isinstance(x, str) else len(x) for x in inputs)
    scores = [(zlib.crc32(t.encode()) % 20001) / 10000.0 - 1.0 for t in texts]
    await asgi.send_json(
        send,
        200,
        {
            "id": new_id("pool"),
            "object": "list",
            "created": rt.created,
            "model": body.get("model") or rt.model_name,
            "data": [{"index": i, "object": "pooling", "data": s} for i, s in enumerate(scores)],
            "usage": usage(prompt_tokens, 0),
        },
    )


async def embeddings(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    # The body is validated (EmbeddingsRequest) before the handler refuses it.
    body = await object_body(receive)
    if "input" not in body:
        raise BadRequest("input: Field required")
    await asgi.send_error(send, 400, "Unsupported by turbomind.")


async def metrics(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    """LMDeploy 0.18's load gauges and token counters, in Prometheus text format.

    The names and labels the real api_server exports (lmdeploy/metrics/loggers.py),
    one engine: `running` is what is in the batch, `waiting` what queues for it;
    the KV cache usage is the batch's share of its slots. `name[]` in the query
    keeps only the named samples, as the real server's prometheus_client does.
    """
    wanted = set(query(scope).get("name[]", ()))
    stats, scheduler = rt.stats, rt.scheduler
    waiting = scheduler.waiting
    running = max(0, stats.inflight - waiting)
    hit_rate = stats.cached_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0
    labels = f'{{model_name="{rt.model_name}",engine="0"}}'
    samples = (
        ("gauge", "num_requests_running", running),
        ("gauge", "num_requests_waiting", waiting),
        ("gauge", "num_api_requests_waiting", 0),
        ("gauge", "num_api_requests_routed", stats.inflight),
        ("gauge", "gpu_cache_usage_perc", min(1.0, running / max(1, scheduler.max_batch))),
        ("gauge", "prefix_cache_hit_rate", hit_rate),
        ("counter", "prompt_tokens_total", float(stats.prompt_tokens)),
        ("counter", "generation_tokens_total", float(stats.generated_tokens)),
    )
    lines = []
    for kind, name, value in samples:
        if not wanted or f"lmdeploy:{name}" in wanted:
            lines += [f"# TYPE lmdeploy:{name} {kind}", f"lmdeploy:{name}{labels} {value}"]
    body = ("\n".join(lines) + "\n").encode()
    await asgi.send_bytes(send, 200, body, b"text/plain; version=0.0.4; charset=utf-8")


# -- simulator-only admin routes -------------------------------------------------


async def sim_stats(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    await asgi.send_json(send, 200, rt.stats_json())


async def sim_stats_reset(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    rt.stats.reset()
    rt.distserve.reset()
    rt.weights.reset()
    await asgi.send_json(send, 200, rt.stats_json())


async def sim_faults_get(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    await asgi.send_json(send, 200, rt.faults.to_json())


async def sim_faults_set(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    body = json.loads(await asgi.read_body(receive) or b"{}")
    try:
        rt.faults.update(body)
    except ValueError as exc:
        await asgi.send_error(send, 400, str(exc))
        return
    await asgi.send_bytes(send, 200, dumps(rt.faults.to_json()))
