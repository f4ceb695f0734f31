"""vLLM's and SGLang's HTTP surfaces, beside LMDeploy's (`lmfleet sim --engine`).

The inference routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`)
and the cost model are shared; what differs is what a fleet controller talks to,
each as the pinned release's own source has it (docs/guide/engines.md cites the
files):

- vLLM 0.33.0: `GET /health` (200, empty), `GET /version`, `GET /ping`; with
  `VLLM_SERVER_DEV_MODE=1` (the default here; `--no-dev-mode` leaves them out)
  `POST /sleep?level=&mode=`, `POST /wake_up?tags=`, `GET /is_sleeping`,
  `POST /abort_requests`, and the weight transfer's `/start_weight_update`,
  `/update_weights {"update_info"}`, `/finish_weight_update {"weight_version"}`
  and `GET /weight_info`. A request sent while asleep is queued (its scheduler
  is paused) and runs after the wakeup. `/metrics`: `vllm:num_requests_running`,
  `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, the token counters and
  `vllm:engine_sleep_state`, labelled `model_name` and `engine`.
- SGLang 0.5.23: `GET /health` and `/health_generate` (200, empty), `GET /ready`
  (503 while starting or paused), `GET /server_info` (its `version`),
  `GET /model_info` (its `weight_version`), `POST /release_memory_occupation` and
  `/resume_memory_occupation` with `{"tags": [...] | null}` (release refuses
  unless the server is idle), `POST /abort_request {rid | abort_all}`,
  `POST /update_weights_from_tensor` (tensors per rank, `weight_version`), the NCCL
  group routes under LMDeploy's names and bodies (`/init_weights_update_group`,
  `/update_weights_from_distributed` with `weight_version`,
  `/destroy_weights_update_group`). No route
  says it is asleep. `/metrics`: `sglang:num_running_reqs`, `sglang:num_queue_reqs`,
  `sglang:token_usage`, `sglang:cache_hit_rate`, `sglang:gen_throughput`, the token
  counters, labelled `model_name`, `engine_type`, `tp_rank`, `pp_rank`, `moe_ep_rank`.
"""

from __future__ import annotations

from typing import Any

from lmfleet.sim import asgi
from lmfleet.sim.node import NodeRuntime
from lmfleet.sim.routes import Handler, is_sleeping, object_body, query
from lmfleet.sim.weight_routes import GROUP_ROUTES
from lmfleet.sim.weights import call_line

VERSIONS = {"lmdeploy": "0.18.0", "vllm": "0.33.0", "sglang": "0.5.23"}
"""The release each surface is read from."""

SGLANG_TAGS = ("kv_cache", "weights", "cuda_graph")
"""SGLang's memory types (sglang/srt/constants.py): released together when no tag is given."""

PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"


async def bare_health(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    """A bare status, as vLLM's `/health` and SGLang's `/health` and `/ready` answer:
    200 once started, 503 while starting (or when a health fault says the engine is
    not healthy)."""
    state = rt.faults.health or rt.live_health()
    code = 200 if state in ("healthy", "sleeping") else 503
    await asgi.send_bytes(send, code, b"", None)


# -- vLLM ---------------------------------------------------------------------


async def vllm_version(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    await asgi.send_json(send, 200, {"version": VERSIONS["vllm"]})


async def vllm_sleep(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    await asgi.read_body(receive)
    rt.weights.record_call(call_line(scope))
    args = query(scope)
    try:
        level = int(args.get("level", ["1"])[-1])
    except ValueError:
        level = -1
    mode = args.get("mode", ["abort"])[-1]
    if not 0 <= level <= 2 or mode not in ("abort", "wait", "keep"):
        # FastAPI's query validation: 422 with the field's error.
        detail = [{"type": "value_error", "loc": ["query", "level" if level < 0 else "mode"]}]
        await asgi.send_json(send, 422, {"detail": detail})
        return
    rt.sleep(level)
    await asgi.send_json(send, 200, {"status": "sleeping", "level": level})


async def vllm_wake_up(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    await asgi.read_body(receive)
    rt.weights.record_call(call_line(scope))
    tags = query(scope).get("tags") or None
    awake = rt.wake_tags(tags)
    await asgi.send_json(send, 200, {"status": "awake" if awake else "sleeping", "tags": tags})


async def vllm_abort_requests(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    body = await object_body(receive)
    ids = body.get("request_ids")
    if ids:  # by the callers' request ids; one the engine does not know is skipped
        count = sum(rt.abort_session(rt.engine_requests.get(str(i), -1)) for i in ids)
        await asgi.send_json(send, 200, {"status": "aborted", "aborted": count})
        return
    count = len(rt.sequences)
    rt.abort_all()
    await asgi.send_json(send, 200, {"status": "aborted", "aborted": count})


async def vllm_start_weight_update(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    await asgi.read_body(receive)
    rt.weights.record_call(call_line(scope))
    rt.weights.buckets = rt.weights.crc = 0
    await asgi.send_json(send, 200, {"message": "Weight update started"})


async def vllm_update_weights(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    body = await object_body(receive)
    rt.weights.record_call(call_line(scope))
    if "update_info" not in body:
        # FastAPI's Body(embed=True) validation.
        detail = [{"type": "missing", "loc": ["body", "update_info"], "msg": "Field required"}]
        await asgi.send_json(send, 422, {"detail": detail})
        return
    rt.weights.add_bucket(body["update_info"])
    await asgi.send_json(send, 200, {"message": "Weights updated"})


async def vllm_finish_weight_update(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    body = await object_body(receive)
    rt.weights.record_call(call_line(scope))
    version = body.get("weight_version")
    rt.weights.finish(serving=rt.serving, weight_version=None if version is None else str(version))
    await asgi.send_json(send, 200, {"message": "Weight update finished"})


async def vllm_weight_info(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    await asgi.send_json(send, 200, {"weight_version": rt.weights.weight_version})


# -- SGLang -------------------------------------------------------------------


async def sglang_server_info(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    info = {
        "model_path": rt.options.model,
        "served_model_name": rt.model_name,
        "exec": {
            "features": {
                "enable_memory_saver": True,
                "enable_weights_cpu_backup": rt.options.weights_cpu_backup,
            }
        },
        "enable_metrics": rt.options.enable_metrics,
        "version": VERSIONS["sglang"],
        "frontend": "python",
    }
    await asgi.send_json(send, 200, info)


async def sglang_model_info(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    info: dict[str, Any] = {
        "model_path": rt.options.model,
        "served_model_name": rt.model_name,
        "is_generation": True,
        "weight_version": rt.weights.weight_version,
    }
    await asgi.send_json(send, 200, info)


def _tags(body: dict[str, Any]) -> list[str] | None:
    tags = body.get("tags")
    return [str(t) for t in tags] if isinstance(tags, list) and tags else None


async def sglang_release(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    body = await object_body(receive)
    rt.weights.record_call(call_line(scope))
    if rt.stats.inflight:
        # The scheduler's assertion, as `_create_error_response` renders it.
        message = "release_memory_occupation should be called only when server is idle."
        await asgi.send_json(send, 400, {"error": {"message": message}})
        return
    rt.sleep(1, _tags(body) or SGLANG_TAGS)
    await asgi.send_bytes(send, 200, b"null", b"application/json")


async def sglang_resume(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    body = await object_body(receive)
    rt.weights.record_call(call_line(scope))
    rt.wake_tags(_tags(body))
    await asgi.send_bytes(send, 200, b"null", b"application/json")


async def sglang_update_weights_from_tensor(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    body = await object_body(receive)
    rt.weights.record_call(call_line(scope))
    tensors = body.get("serialized_named_tensors")
    if not isinstance(tensors, list):
        message = "serialized_named_tensors: Input should be a valid list"
        await asgi.send_json(send, 400, {"success": False, "message": message})
        return
    for rank in tensors:
        rt.weights.add_bucket(rank)
    version = body.get("weight_version")
    if version is not None:  # lmfleet names the version on an update's last bucket
        rt.weights.finish(serving=rt.serving, weight_version=str(version))
    await asgi.send_json(
        send, 200, {"success": True, "message": "Succeeded to update model weights."}
    )


async def sglang_abort_request(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    body = await object_body(receive)
    if body.get("abort_all"):
        rt.abort_all()
    elif isinstance(body.get("rid"), str):
        rt.abort_session(rt.engine_requests.get(body["rid"], -1))
    await asgi.send_bytes(send, 200, b"", None)


def control_routes(rt: NodeRuntime) -> dict[str, dict[str, Handler]]:
    """The engine's own control routes (health, version, sleep, wake, abort) for
    vLLM and SGLang; LMDeploy's are the app's defaults."""
    engine = rt.options.engine
    gauges: dict[str, dict[str, Handler]] = (
        {"/metrics": {"GET": metrics}} if rt.options.enable_metrics else {}
    )
    if engine == "vllm":
        table: dict[str, dict[str, Handler]] = {
            "/health": {"GET": bare_health},
            "/ping": {"GET": bare_health, "POST": bare_health},
            "/version": {"GET": vllm_version},
        }
        if rt.options.dev_mode:
            table |= {
                "/sleep": {"POST": vllm_sleep},
                "/wake_up": {"POST": vllm_wake_up},
                "/is_sleeping": {"GET": is_sleeping},
                "/abort_requests": {"POST": vllm_abort_requests},
                "/start_weight_update": {"POST": vllm_start_weight_update},
                "/update_weights": {"POST": vllm_update_weights},
                "/finish_weight_update": {"POST": vllm_finish_weight_update},
                "/weight_info": {"GET": vllm_weight_info},
            }
        return table | gauges
    if engine == "sglang":
        both = ("GET", "POST")
        return gauges | {
            "/health": {"GET": bare_health},
            "/health_generate": {"GET": bare_health},
            "/ready": {"GET": bare_health},
            "/server_info": {"GET": sglang_server_info},
            "/get_server_info": {"GET": sglang_server_info},
            "/model_info": {"GET": sglang_model_info},
            "/release_memory_occupation": dict.fromkeys(both, sglang_release),
            "/resume_memory_occupation": dict.fromkeys(both, sglang_resume),
            "/abort_request": {"POST": sglang_abort_request},
            "/update_weights_from_tensor": {"POST": sglang_update_weights_from_tensor},
            **GROUP_ROUTES,
        }
    return {}


# -- /metrics -------------------------------------------------------------------


async def metrics(
    rt: NodeRuntime, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send
) -> None:
    """`/metrics`; `name[]` keeps the named samples, as prometheus_client does."""
    wanted = set(query(scope).get("name[]", ()))
    await asgi.send_bytes(send, 200, metrics_text(rt, wanted), PROMETHEUS)


def metrics_text(rt: NodeRuntime, wanted: set[str]) -> bytes:
    """The engine's `/metrics` in Prometheus text format, only `wanted` names when given."""
    engine = rt.options.engine
    stats, scheduler = rt.stats, rt.scheduler
    waiting = scheduler.waiting
    running = max(0, stats.inflight - waiting)
    usage = min(1.0, running / max(1, scheduler.max_batch))
    hit_rate = stats.cached_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0
    model = rt.model_name
    samples: list[tuple[str, str, str, float]]
    if engine == "vllm":
        labels = f'model_name="{model}",engine="0"'
        asleep = rt.is_sleeping
        samples = [
            ("gauge", "vllm:num_requests_running", labels, running),
            ("gauge", "vllm:num_requests_waiting", labels, waiting),
            ("gauge", "vllm:kv_cache_usage_perc", labels, usage),
            ("counter", "vllm:prompt_tokens_total", labels, float(stats.prompt_tokens)),
            ("counter", "vllm:generation_tokens_total", labels, float(stats.generated_tokens)),
        ] + [
            (
                "gauge",
                "vllm:engine_sleep_state",
                f'{labels},sleep_state="{state}"',
                float(value),
            )
            for state, value in (
                ("awake", not asleep),
                ("weights_offloaded", asleep and rt.sleep_level == 1),
                ("discard_all", asleep and rt.sleep_level == 2),
            )
        ]
    else:  # sglang
        labels = (
            f'model_name="{model}",engine_type="unified",tp_rank="0",pp_rank="0",moe_ep_rank="0"'
        )
        streaming = f'{labels},is_streaming="false"'
        samples = [
            ("gauge", "sglang:num_running_reqs", labels, running),
            ("gauge", "sglang:num_queue_reqs", labels, waiting),
            ("gauge", "sglang:token_usage", labels, usage),
            ("gauge", "sglang:cache_hit_rate", labels, hit_rate),
            ("gauge", "sglang:gen_throughput", labels, 0.0),
            ("counter", "sglang:prompt_tokens_total", streaming, float(stats.prompt_tokens)),
            ("counter", "sglang:generation_tokens_total", streaming, float(stats.generated_tokens)),
        ]
    lines: list[str] = []
    typed: set[str] = set()
    for kind, name, label, value in samples:
        if wanted and name not in wanted:
            continue
        family = name.removesuffix("_total") if kind == "counter" else name
        if family not in typed:
            typed.add(family)
            lines.append(f"# TYPE {family} {kind}")
        lines.append(f"{name}{{{label}}} {value}")
    return ("\n".join(lines) + "\n").encode()
