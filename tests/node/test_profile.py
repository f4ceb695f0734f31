"""Engine profiles: recognising an engine, each one's commands, health answers and
`/metrics` names, and the typed error for what an engine cannot do."""

from __future__ import annotations

import pytest

from lmfleet import ConfigError, EngineCapabilityError
from lmfleet.node.load import parse_metrics
from lmfleet.node.profile import (
    LMDEPLOY,
    OPENAI,
    SGLANG,
    VLLM,
    parse_engine,
    profile_named,
    recognise,
)


def cards(owner: str) -> dict[str, object]:
    return {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": owner}]}


def test_an_engine_is_recognised_by_its_model_cards() -> None:
    assert recognise(cards("lmdeploy")) is LMDEPLOY
    assert recognise(cards("vllm")) is VLLM
    assert recognise(cards("sglang")) is SGLANG
    assert recognise(cards("llamacpp")) is OPENAI  # any other server: routing and health
    assert recognise({"data": []}) is OPENAI
    assert recognise("not json") is OPENAI
    assert profile_named(None) is LMDEPLOY  # not recognised yet: its reader reads them all


def test_engine_names_are_checked() -> None:
    assert parse_engine("auto", "x") is None
    assert parse_engine(None, "x") is None
    assert parse_engine("vllm", "x") == "vllm"
    with pytest.raises(ConfigError, match="engine must be one of auto, lmdeploy, vllm, sglang"):
        parse_engine("tgi", "attach")


def test_each_engine_sleeps_and_wakes_through_its_own_route() -> None:
    assert (LMDEPLOY.sleep(2).path, LMDEPLOY.sleep(2).params) == ("/sleep", [("level", "2")])
    assert LMDEPLOY.wakeup(["weights"]).path == "/wakeup"
    vllm = VLLM.sleep(1)
    assert (vllm.path, vllm.params) == ("/sleep", [("level", "1"), ("mode", "abort")])
    assert VLLM.wakeup(["kv_cache"]).params == [("tags", "kv_cache")]
    assert VLLM.wakeup(None).path == "/wake_up"
    sglang = SGLANG.sleep(2)
    assert (sglang.path, sglang.json) == ("/release_memory_occupation", {"tags": None})
    wake = SGLANG.wakeup(["weights"])
    assert (wake.path, wake.json) == ("/resume_memory_occupation", {"tags": ["weights"]})
    assert SGLANG.fully_awake(None) and not SGLANG.fully_awake(["weights"])


def test_what_an_engine_cannot_do_is_a_typed_error_naming_it() -> None:
    with pytest.raises(EngineCapabilityError, match="an OpenAI-compatible server cannot sleep"):
        OPENAI.sleep(1)
    with pytest.raises(EngineCapabilityError) as caught:
        VLLM.abort(7)
    assert caught.value.engine == "vLLM" and "session id" in caught.value.capability
    assert VLLM.abort(None).json == {}  # every request: that it can do
    assert VLLM.abort("r1").json == {"request_ids": ["r1"]}  # one, by its request id
    assert SGLANG.abort("r1").json == {"rid": "r1"}
    with pytest.raises(EngineCapabilityError, match="string id"):
        LMDEPLOY.abort("r1")
    with pytest.raises(EngineCapabilityError, match="sleep level 3"):
        LMDEPLOY.sleep(3)


def test_health_answers_of_each_engine() -> None:
    asleep = b'{"is_sleeping":true}'
    assert VLLM.read_health([(200, b""), (200, asleep)]).status == "sleeping"
    assert VLLM.read_health([(200, b""), (200, b'{"is_sleeping":false}')]).status == "healthy"
    assert VLLM.read_health([(200, b""), (404, b"")]).status == "healthy"  # no dev mode
    assert VLLM.read_health([(503, b""), (200, asleep)]).status == "unhealthy"
    assert SGLANG.read_health([(200, b"")]).status == "up"  # asleep or not: it cannot say
    assert SGLANG.read_health([(503, b"")]).status == "unhealthy"
    assert LMDEPLOY.read_health([(200, b'{"status":"sleeping"}')]).status == "sleeping"


VLLM_METRICS = b"""# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
vllm:generation_tokens_total{engine="0",model_name="m"} 900.0
vllm:prompt_tokens_total{engine="0",model_name="m"} 100.0
"""

SGLANG_METRICS = b"""# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",engine_type="unified",tp_rank="0",pp_rank="0",dp_rank="0"} 4
sglang:num_running_reqs{model_name="m",engine_type="unified",tp_rank="0",pp_rank="0",dp_rank="1"} 2
sglang:num_queue_reqs{model_name="m",engine_type="unified",tp_rank="0",pp_rank="0",dp_rank="0"} 5
sglang:token_usage{model_name="m",engine_type="unified",tp_rank="0",pp_rank="0",dp_rank="0"} 0.75
sglang:cache_hit_rate{model_name="m",engine_type="unified",tp_rank="0",pp_rank="0",dp_rank="0"} 0.5
sglang:generation_tokens_total{model_name="m",is_streaming="true"} 70
sglang:generation_tokens_total{model_name="m",is_streaming="false"} 30
"""


def test_vllm_and_sglang_metrics_are_read_by_their_own_names() -> None:
    assert VLLM.metrics is not None and SGLANG.metrics is not None
    vllm = parse_metrics(VLLM_METRICS, names=VLLM.metrics)
    assert vllm is not None
    assert (vllm.running, vllm.waiting, vllm.cache_usage) == (4.0, 2.0, 0.375)
    assert (vllm.generation_tokens, vllm.api_waiting) == (900.0, None)
    sglang = parse_metrics(SGLANG_METRICS, names=SGLANG.metrics)
    assert sglang is not None
    assert (sglang.running, sglang.waiting, sglang.cache_usage) == (6.0, 5.0, 0.75)
    assert (sglang.prefix_hit_rate, sglang.generation_tokens) == (0.5, 100.0)
    # Another engine's answer is no report: names are never guessed across engines.
    assert parse_metrics(VLLM_METRICS, names=SGLANG.metrics) is None
    assert parse_metrics(SGLANG_METRICS) is None  # LMDeploy's names
    assert "name%5B%5D=sglang:num_running_reqs" in SGLANG.metrics.path
