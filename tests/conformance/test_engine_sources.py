"""The vLLM and SGLang profiles (and the simulator's surfaces for them) against the
engines' own source at the pinned releases.

Neither engine's HTTP server runs on a CPU-only machine without its GPU stack, so
their route tables, answers and metric names are read from the released wheels
(`make engine-sources`: `pip download --no-deps vllm==0.33.0 sglang==0.5.23` into
.cache/engines, about 375 MB; `LMFLEET_ENGINE_WHEELS` names another folder). A
route or name the profile or the simulator uses that the release does not have
fails here. Skipped, with the reason, where the wheels are not there.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmfleet.node.profile import SGLANG, VLLM, EngineProfile
from lmfleet.sim.app import SimApp
from lmfleet.sim.options import SimOptions
from lmfleet.transport.token_dialects import SGLANG as SGLANG_TOKENS
from lmfleet.transport.token_dialects import VLLM as VLLM_TOKENS

ROOT = Path(__file__).resolve().parents[2]
WHEELS = Path(os.environ.get("LMFLEET_ENGINE_WHEELS", ROOT / ".cache" / "engines"))
PINNED = {profile.name: profile.release for profile in (VLLM, SGLANG)}
"""The releases the profiles were read from: the wheels checked here."""
ROUTE = re.compile(
    r"@(?:router|app)\.(get|post|put|api_route)\(\s*(?:os\.environ\.get\([^,]+,\s*)?"
    r"\"([^\"]+)\"(?:[^)]*?methods=\[([^\]]*)\])?",
    re.S,
)


class Source:
    """The Python files of one engine's wheel, read without installing it."""

    def __init__(self, wheel: Path) -> None:
        self._zip = zipfile.ZipFile(wheel)
        self.names = [n for n in self._zip.namelist() if n.endswith(".py")]

    def text(self, name: str) -> str:
        return self._zip.read(name).decode()

    def under(self, prefix: str) -> Iterator[tuple[str, str]]:
        for name in self.names:
            if name.startswith(prefix):
                yield name, self.text(name)

    def routes(self, prefix: str) -> dict[str, set[str]]:
        """path -> its methods, over every file under `prefix`."""
        found: dict[str, set[str]] = {}
        for _, text in self.under(prefix):
            for verb, path, methods in ROUTE.findall(text):
                if verb == "api_route":
                    verbs = {m.strip().strip("\"'") for m in methods.split(",") if m.strip()}
                else:
                    verbs = {verb.upper()}
                found.setdefault(path, set()).update(verbs)
        return found


def source(engine: str) -> Source:
    wheels = sorted(WHEELS.glob(f"{engine}-{PINNED[engine]}-*.whl"))
    if not wheels:
        pytest.skip(
            f"no {engine} {PINNED[engine]} wheel in {WHEELS}: run `make engine-sources` "
            f"(pip download --no-deps {engine}=={PINNED[engine]})"
        )
    return Source(wheels[0])


@pytest.fixture(scope="module")
def vllm() -> Source:
    return source("vllm")


@pytest.fixture(scope="module")
def sglang() -> Source:
    return source("sglang")


def profile_routes(profile: EngineProfile) -> dict[str, str]:
    """path -> method of every route the profile uses (the metrics route aside)."""
    used = {path: "GET" for path in profile.health}
    used[profile.models] = "GET"
    for path in (profile.is_sleeping, profile.version[0] if profile.version else None):
        if path is not None:
            used[path] = "GET"
    used[profile.sleep(1).path] = "POST"
    used[profile.wakeup(None).path] = "POST"
    used[profile.abort(None).path] = "POST"
    bucket = {"serialized_named_tensors": "x", "finished": True}
    for call in profile.push(bucket, 1, first=True):
        used[call.path] = call.method
    return used


def sim_routes(engine: str) -> dict[str, dict[str, object]]:
    """The simulator's routes for `engine`, less its own `/sim/*` and `/metrics`."""
    table = SimApp(SimOptions(engine=engine))._routes  # type: ignore[arg-type]
    return {p: m for p, m in table.items() if not p.startswith("/sim/") and p != "/metrics"}


def check_routes(real: dict[str, set[str]], profile: EngineProfile, engine: str) -> None:
    for path, method in profile_routes(profile).items():
        assert path in real, f"{engine} {PINNED[engine]} has no route {path}"
        assert method in real[path], f"{engine}: {path} takes {real[path]}, not {method}"
    for path, methods in sim_routes(engine).items():
        assert path in real, f"the simulator's {engine} serves {path}, the release does not"
        assert set(methods) <= real[path], (path, set(methods), real[path])


def test_vllm_routes(vllm: Source) -> None:
    check_routes(vllm.routes("vllm/entrypoints/"), VLLM, "vllm")
    routers = vllm.text("vllm/entrypoints/launchers/api_server/routers.py")
    dev = routers.index("if envs.VLLM_SERVER_DEV_MODE:")
    # The sleep routes exist only with VLLM_SERVER_DEV_MODE=1: the profile's hint says so.
    assert dev < routers.index("register_vllm_dev_api_routers(app)")
    assert "VLLM_SERVER_DEV_MODE=1" in VLLM.needs
    sleep = vllm.text("vllm/entrypoints/serve/dev/sleep/api_router.py")
    assert '{"is_sleeping": is_sleeping}' in sleep
    assert '"status": "awake" if fully_awake else "sleeping"' in sleep
    assert 'tags = raw_request.query_params.getlist("tags")' in sleep
    assert "level: Annotated[int, Query(ge=0, le=2)] = 1" in sleep
    assert 'mode: Annotated[PauseMode, Query()] = "abort"' in sleep
    basic = vllm.text("vllm/entrypoints/serve/instrumentator/basic.py")
    assert '{"version": VLLM_VERSION}' in basic
    health = vllm.text("vllm/entrypoints/serve/instrumentator/health.py")
    assert "except EngineDeadError:\n        return Response(status_code=503)" in health
    protocol = vllm.text("vllm/entrypoints/serve/engine/protocol.py")
    assert 'owned_by: str = "vllm"' in protocol
    rl = vllm.text("vllm/entrypoints/rl/online/api_router.py")
    assert "update_info: Annotated[WeightTransferUpdatePayload, Body(embed=True)]" in rl
    assert "weight_version: Annotated[str | None, Body(embed=True)] = None" in rl
    assert '{"weight_version": weight_version}' in rl


def test_vllm_metric_names(vllm: Source) -> None:
    loggers = vllm.text("vllm/v1/metrics/loggers.py")
    assert VLLM.metrics is not None
    for sample in VLLM.metrics.samples:
        # prometheus_client exposes a Counter named `x` as `x_total`.
        assert f'name="{sample}"' in loggers or f'name="{sample.removesuffix("_total")}"' in loggers
    assert 'labelnames=labelnames + ["sleep_state"]' in loggers


def test_sglang_routes(sglang: Source) -> None:
    real = sglang.routes("sglang/srt/entrypoints/http_server.py")
    check_routes(real, SGLANG, "sglang")
    server = sglang.text("sglang/srt/entrypoints/http_server.py")
    assert '"version": __version__' in server
    assert "status_code = 200 if _global_state.tokenizer_manager.is_ready() else 503" in server
    io = sglang.text("sglang/srt/managers/io_struct.py")

    def body(name: str) -> str:
        start = io.index(f"class {name}(")
        return io[start : io.index("\nclass ", start)]

    for request in ("ReleaseMemoryOccupationReqInput", "ResumeMemoryOccupationReqInput"):
        assert "tags: Optional[List[str]] = None" in body(request), request
    assert "abort_all: bool = False" in body("AbortReq")
    group = body("InitWeightsUpdateGroupReqInput")
    for field in ("master_address: str", "master_port: int", "rank_offset: int", "world_size"):
        assert field in group, field  # LMDeploy's init body, which lmfleet sends to both
    distributed = body("UpdateWeightsFromDistributedReqInput")
    for field in ("names: List[str]", "dtypes: List[str]", "shapes: List[List[int]]"):
        assert field in distributed, field
    assert "weight_version: Optional[str] = None" in distributed
    tensors = body("UpdateWeightsFromTensorReqInput")
    for field in ("serialized_named_tensors: Annotated[List[bytes]", "flush_cache: bool = True"):
        assert field in tensors, field
    assert "weight_version: Optional[str] = None" in tensors
    assert '"weight_version": _global_state.tokenizer_manager.config_value(' in (
        sglang.text("sglang/srt/entrypoints/http_server.py")
    )
    protocol = sglang.text("sglang/srt/entrypoints/openai/protocol.py")
    assert 'owned_by: str = "sglang"' in protocol
    features = sglang.text("sglang/srt/arg_groups/fields/exec_.py")
    for setting in ("enable_memory_saver", "enable_weights_cpu_backup"):
        assert f"    {setting}: A[" in features, setting  # flags launch(engine=) passes
    updater = sglang.text("sglang/srt/managers/scheduler_components/weight_updater.py")
    assert "self.offload_tags.remove(tag)" in updater  # resume names only released tags
    constants = sglang.text("sglang/srt/constants.py")
    for tag in SGLANG.wake_tags:
        assert f'= "{tag}"' in constants, tag


def test_sglang_metric_names(sglang: Source) -> None:
    collector = sglang.text("sglang/srt/observability/metrics_collector.py")
    assert SGLANG.metrics is not None
    for sample in SGLANG.metrics.samples:
        assert f'name="{sample}"' in collector, sample


def test_the_token_routes_the_fleet_continues(vllm: Source, sglang: Source) -> None:
    """What transport/token_dialects.py relies on: each route, its body's fields and
    budget default, the shape of its events, and the ids its abort route takes."""
    assert "POST" in vllm.routes("vllm/entrypoints/").get(VLLM_TOKENS.path, set())
    tokens = vllm.text("vllm/entrypoints/scale_out/token_in_token_out/protocol.py")
    request = tokens[tokens.index("class GenerateRequest(") :]
    for field in (
        "request_id: str = Field(",
        "token_ids: list[int] = Field(min_length=1)",
        "sampling_params: SamplingParams",
        "stream: bool | None = False",
    ):
        assert field in request, field
    choice = tokens[tokens.index("class GenerateStreamChoiceBase(") :]
    for field in ("finish_reason: str | None = None", "token_ids: list[int] | None = None"):
        assert field in choice, field
    sampling = vllm.text("vllm/sampling_params.py")
    assert f"max_tokens: int | None = {VLLM_TOKENS.default_max_tokens}" in sampling
    outputs = vllm.text("vllm/outputs.py")
    span = outputs[outputs.index("class WeightVersionSpan") :]
    assert "version: str\n    start: int\n    end: int" in span
    rl = vllm.text("vllm/entrypoints/rl/online/api_router.py")
    assert 'request_ids = body.get("request_ids")' in rl

    assert "POST" in sglang.routes("sglang/srt/entrypoints/http_server.py")[SGLANG_TOKENS.path]
    io = sglang.text("sglang/srt/managers/io_struct.py")
    generate = io[io.index("class GenerateReqInput:") :]
    for field in (
        "rid: Optional[Union[str, List[str]]]",
        "text: Optional[Union[List[str], str]] = None",
        "input_ids: Annotated[",
        "sampling_params: Optional[Union[List[Dict[str, Any]], Dict[str, Any]]] = None",
    ):
        assert field in generate, field
    base = io[io.index("class BaseReq(") :]
    assert "rid: Optional[str] = None" in base  # AbortReq's rid, beside abort_all
    params = sglang.text("sglang/srt/sampling/sampling_params.py")
    assert f"max_new_tokens: Optional[int] = {SGLANG_TOKENS.default_max_tokens}" in params
    manager = sglang.text("sglang/srt/managers/tokenizer_manager.py")
    # Cumulative events unless --incremental-streaming-output: both are read.
    assert '"output_ids": state.output_ids.copy(),' in manager
    assert "incremental = is_stream and self.incremental_streaming_output" in manager
