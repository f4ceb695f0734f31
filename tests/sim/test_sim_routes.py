"""LMDeploy's routes, shapes, codes and messages, in-process through httpx2.ASGITransport."""

from __future__ import annotations

import pytest
from support import wait_until_async

from tests.sim.conftest import MODEL, ClientFactory, chat_body

pytestmark = pytest.mark.anyio
JSON = {"content-type": "application/json"}
ERROR_KEYS = {"message", "type", "code", "param", "object"}
UNAUTHORIZED = {
    "message": "Unauthorized.",
    "type": "authentication_error",
    "code": 401,
    "param": None,
    "object": "error",
}


async def test_health_and_models_shapes(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True) as client:
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "healthy", "message": "Engine is healthy."}
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list"
        [card] = models["data"]
        assert card["id"] == card["root"] == MODEL
        assert card["object"] == "model" and card["owned_by"] == "lmdeploy"
        assert card["permission"][0]["object"] == "model_permission"


async def test_served_model_name_replaces_the_path(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True, served_model_name="alias") as client:
        assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["alias"]
        ok = await client.post("/v1/chat/completions", json={**chat_body(), "model": "alias"})
        assert ok.status_code == 200 and ok.json()["model"] == "alias"


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [("unhealthy", "unhealthy", 503), ("initializing", "initializing", 503)],
)
async def test_health_fault_states(
    asgi_client: ClientFactory, fault: str, status: str, code: int
) -> None:
    async with asgi_client(fast=True, health_fault=fault) as client:
        response = await client.get("/health")
        assert response.status_code == code
        assert response.json()["status"] == status
        assert isinstance(response.json()["message"], str)


async def test_initializing_for_a_while_after_start(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True, initializing_for=60) as client:
        response = await client.get("/health")
        assert (response.status_code, response.json()["status"]) == (503, "initializing")


async def test_sleep_wakeup_round_trip_with_tags(asgi_client: ClientFactory) -> None:
    options = {"backend": "pytorch", "distributed_executor_backend": "ray"}
    async with asgi_client(fast=True, **options) as client:
        assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}
        slept = await client.post("/sleep?level=2", headers=JSON)
        assert (slept.status_code, slept.content) == (200, b"")
        assert (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
        health = await client.get("/health")
        assert (health.status_code, health.json()["status"]) == (200, "sleeping")
        refused = await client.post("/v1/chat/completions", json=chat_body())
        assert refused.status_code == 503
        assert "Engine is sleeping" in refused.json()["message"]
        assert (await client.post("/wakeup?tags=weights", headers=JSON)).status_code == 200
        assert (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
        update = await client.post(
            "/update_weights", json={"serialized_named_tensors": "x", "finished": True}
        )
        assert (update.status_code, update.json()) == (200, None)
        assert (await client.post("/wakeup?tags=kv_cache", headers=JSON)).status_code == 200
        assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}
        assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200
        await client.post("/sleep", headers=JSON)  # level defaults to 1
        assert (await client.post("/wakeup", headers=JSON)).status_code == 200
        assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}


@pytest.mark.parametrize("path", ["/sleep", "/wakeup"])
async def test_sleep_and_wakeup_need_json_content_type(
    asgi_client: ClientFactory, path: str
) -> None:
    async with asgi_client(fast=True) as client:
        for headers in ({}, {"content-type": "text/plain"}):
            response = await client.post(path, headers=headers)
            assert response.status_code == 400
            assert set(response.json()) == ERROR_KEYS
        assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}
        ok = await client.post(path, headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200


@pytest.mark.parametrize(("level", "word"), [("3", "1 or 2"), ("0", "1 or 2"), ("x", "integer")])
async def test_sleep_level_must_be_1_or_2(
    asgi_client: ClientFactory, level: str, word: str
) -> None:
    async with asgi_client(fast=True) as client:
        response = await client.post(f"/sleep?level={level}", headers=JSON)
        assert response.status_code == 400
        assert word in response.json()["message"]
        assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}


async def test_health_lags_sleep_by_the_poll_interval(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True, health_poll_interval=3600) as client:
        assert (await client.get("/health")).json()["status"] == "healthy"
        await client.post("/sleep", headers=JSON)
        # /is_sleeping and inference know at once; the cached /health does not.
        assert (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
        assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 503
        lagging = await client.get("/health")
        assert (lagging.status_code, lagging.json()["status"]) == (200, "healthy")


async def test_api_keys_on_every_route_but_health(asgi_client: ClientFactory) -> None:
    paths = [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/generate"),
        ("POST", "/sleep"),
        ("POST", "/wakeup"),
        ("GET", "/is_sleeping"),
        ("GET", "/sim/stats"),
        ("POST", "/sim/faults"),
        ("POST", "/update_weights"),
        ("GET", "/no/such/path"),
    ]
    async with asgi_client(fast=True, api_keys=("k1", "k2")) as client:
        for method, path in paths:
            for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "k1"}):
                response = await client.request(method, path, headers={**JSON, **headers})
                assert response.status_code == 401, (method, path, headers)
                assert response.json() == UNAUTHORIZED
        assert (await client.get("/health")).status_code == 200
        good = {"authorization": "Bearer k2"}
        assert (await client.get("/v1/models", headers=good)).status_code == 200
        assert (await client.get("/is_sleeping", headers={"authorization": "bearer k1"})).is_success
        chat = await client.post("/v1/chat/completions", json=chat_body(), headers=good)
        assert chat.status_code == 200


async def test_embeddings_are_unsupported(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True) as client:
        response = await client.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
        assert response.status_code == 400
        assert response.json() == {
            "message": "Unsupported by turbomind.",
            "type": "invalid_request_error",
            "code": 400,
            "param": None,
            "object": "error",
        }


async def test_unknown_model_is_404(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True) as client:
        for path, body in [
            ("/v1/chat/completions", {**chat_body(), "model": "nope"}),
            ("/v1/completions", {"model": "nope", "prompt": "hi"}),
        ]:
            response = await client.post(path, json=body)
            assert response.status_code == 404
            assert response.json()["message"] == "The model 'nope' does not exist."
            assert response.json()["object"] == "error"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (chat_body(max_tokens=-1), "max_tokens"),
        (chat_body(max_tokens=0), "max_tokens"),
        (chat_body(n=0), "The n 0 must be a positive int."),
        (chat_body(n="two"), "n"),
        (chat_body(temperature=3), "temperature"),
        (chat_body(top_p=0), "top_p"),
        (chat_body(top_k=-1), "top_k"),
        (chat_body(stop=5), "stop"),
        ({"model": MODEL}, "messages"),
        ({"messages": []}, "model"),
        ([1, 2], "dictionary"),
    ],
)
async def test_invalid_fields_are_400(
    asgi_client: ClientFactory, body: object, needle: str
) -> None:
    async with asgi_client(fast=True) as client:
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400
        assert set(response.json()) == ERROR_KEYS
        assert response.json()["code"] == 400
        assert needle in response.json()["message"]


async def test_malformed_json_and_wrong_content_type(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True) as client:
        broken = await client.post("/v1/chat/completions", content=b"{nope", headers=JSON)
        assert broken.status_code == 400
        assert broken.json()["type"] == "invalid_request_error"
        plain = await client.post(
            "/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"}
        )
        assert plain.status_code == 400
        assert (await client.get("/v1/chat/completions")).status_code == 405
        assert (await client.get("/nope")).status_code == 404
        stats = (await client.get("/sim/stats")).json()
        assert stats["completed"] == 0


async def test_completions_and_n_and_usage(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True, output_tokens=6) as client:
        response = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": ["abcd", "efgh1"], "n": 2}
        )
        data = response.json()
        assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
        assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
        assert {c["finish_reason"] for c in data["choices"]} == {"stop"}
        assert data["usage"] == {
            "prompt_tokens": 3,
            "total_tokens": 27,
            "completion_tokens": 24,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        }
        # CompletionRequest's max_tokens default is 16.
        long = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert long.json()["usage"]["completion_tokens"] == 6


async def test_generate_endpoint_shape(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True, output_tokens=4) as client:
        data = (await client.post("/generate", json={"prompt": "hello there"})).json()
        assert set(data) == {"text", "output_ids", "meta_info"}
        assert len(data["output_ids"]) == 4
        assert data["meta_info"]["finish_reason"] == {"type": "stop"}
        assert data["meta_info"]["prompt_tokens"] == 4  # with BOS, as /v1/encode counts it
        assert data["meta_info"]["completion_tokens"] == 4
        capped = await client.post("/generate", json={"input_ids": [1, 2], "max_tokens": 2})
        assert capped.json()["meta_info"]["finish_reason"] == {"type": "length"}
        both = await client.post("/generate", json={"prompt": "a", "input_ids": [1]})
        assert both.status_code == 400
        assert both.json()["message"] == "You must specify exactly one of prompt or input_ids"


async def test_encode_and_pooling(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True) as client:
        one = (await client.post("/v1/encode", json={"input": "abcdefgh"})).json()
        assert one["length"] == 3 and one["input_ids"][0] == 1
        many = await client.post("/v1/encode", json={"input": ["ab", ""], "add_bos": False})
        assert many.json()["length"] == [1, 0]
        pooled = (await client.post("/pooling", json={"input": ["a", "b"]})).json()
        assert [d["object"] for d in pooled["data"]] == ["pooling", "pooling"]
        assert pooled["usage"]["prompt_tokens"] == 2
        assert (await client.post("/pooling", json={"input": []})).status_code == 400
        assert (await client.post("/v1/encode", content=b"{}")).status_code == 400


async def test_terminate_and_abort_request_are_off_by_default(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True) as client:
        refused = await client.get("/terminate")
        assert refused.status_code == 400
        assert "--allow-terminate-by-client" in refused.json()["message"]
        abort = await client.post("/abort_request", json={"abort_all": True})
        assert abort.status_code == 501
    async with asgi_client(fast=True, enable_abort_handling=True) as client:
        assert (await client.post("/abort_request", json={"abort_all": True})).status_code == 200
        missing = await client.post("/abort_request", json={"session_id": 42})
        assert (missing.status_code, missing.json()["message"]) == (400, "Session 42 not found.")


async def test_faults_route_and_error_injection(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True) as client:
        faults = (await client.get("/sim/faults")).json()
        assert faults["error_rate"] == 0 and faults["health"] is None
        bad = await client.post("/sim/faults", json={"nope": 1})
        assert bad.status_code == 400
        bad_value = await client.post("/sim/faults", json={"error_rate": 2})
        assert bad_value.status_code == 400
        set_ = await client.post("/sim/faults", json={"error_rate": 1.0, "error_status": 503})
        assert set_.json()["error_status"] == 503
        failed = await client.post("/v1/chat/completions", json=chat_body())
        assert failed.status_code == 503 and failed.json()["type"] == "server_error"
        await client.post("/sim/faults", json={"error_rate": 0, "health": "unhealthy"})
        assert (await client.get("/health")).status_code == 503
        assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200
        await client.post("/sim/faults", json={"health": None})
        assert (await client.get("/health")).status_code == 200
        stats = (await client.get("/sim/stats")).json()
        assert (stats["errors_injected"], stats["completed"]) == (1, 1)


async def test_error_rate_is_seeded_and_partial(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True, error_rate=0.5, seed=3) as client:
        codes = [
            (await client.post("/v1/chat/completions", json=chat_body())).status_code
            for _ in range(40)
        ]
    assert set(codes) == {200, 500}
    async with asgi_client(fast=True, error_rate=0.5, seed=3) as client:
        again = [
            (await client.post("/v1/chat/completions", json=chat_body())).status_code
            for _ in range(40)
        ]
    assert again == codes


async def test_stats_count_and_reset(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True, port=4321, output_tokens=5) as client:
        for _ in range(3):
            await client.post("/v1/chat/completions", json=chat_body("abcdefgh"))
        stats = (await client.get("/sim/stats")).json()
        assert stats["by_path"]["/v1/chat/completions"] == 3
        assert (stats["completed"], stats["completion_tokens"]) == (3, 15)
        assert (stats["port"], stats["model"], stats["inflight"]) == (4321, MODEL, 0)
        assert stats["max_inflight"] == 1
        reset = (await client.post("/sim/stats/reset")).json()
        assert reset["requests_total"] == 0 and reset["completed"] == 0


async def test_metrics_unless_disabled(asgi_client: ClientFactory) -> None:
    async with asgi_client(fast=True) as client:  # on by default, as in LMDeploy 0.18
        text = (await client.get("/metrics")).text
        assert "lmdeploy:num_requests_running" in text
        assert "lmdeploy:num_requests_waiting" in text
        # prometheus_client's filter, as the real server answers it
        query = "/metrics?name%5B%5D=lmdeploy:num_requests_waiting&name%5B%5D=lmdeploy:nope"
        samples = [line for line in (await client.get(query)).text.splitlines() if line[0] != "#"]
        assert [line.split("{")[0] for line in samples] == ["lmdeploy:num_requests_waiting"]
    async with asgi_client(fast=True, enable_metrics=False) as client:
        assert (await client.get("/metrics")).status_code == 404


async def test_timed_mode_queues_past_max_batch(asgi_client: ClientFactory) -> None:
    import functools

    import anyio

    async with asgi_client(ttft_ms=150, tpot_ms=1, max_batch=2, output_tokens=2) as client:
        async with anyio.create_task_group() as tg:
            for i in range(5):
                body = chat_body(f"q{i}")
                tg.start_soon(functools.partial(client.post, "/v1/chat/completions", json=body))

            async def read_stats() -> dict[str, int]:
                stats: dict[str, int] = (await client.get("/sim/stats")).json()
                return stats

            stats = await wait_until_async(
                read_stats,
                5,
                "all 5 requests admitted or queued",
                until=lambda stats: stats["running"] + stats["waiting"] == 5,
                step=0.001,  # before the first two finish (150 ms)
            )
            assert (stats["running"], stats["waiting"], stats["inflight"]) == (2, 3, 5)
        stats = (await client.get("/sim/stats")).json()
        assert (stats["completed"], stats["running"], stats["waiting"]) == (5, 0, 0)
