"""`EngineProfile`: which route of a node's engine means what, named once per engine.

Everything lmfleet asks a node outside the routed requests themselves (is it
healthy, is it asleep, how loaded is it, which models does it serve, sleep, wake,
stop, abort, load these weights) is a route whose path, parameters and answer
differ between engines: LMDeploy says `POST /wakeup?tags=`, vLLM
`POST /wake_up?tags=`, SGLang `POST /resume_memory_occupation {"tags": [...]}`.
The node client (`node/client.py`) and the monitor ask the node's profile and
never spell a path themselves, so an engine is a profile, not an edit of every
caller. A capability an engine lacks is None here, and asking for it is an
`EngineCapabilityError` naming the engine and what it cannot do.

Every route below was read from the engines' own source at the pinned releases
(docs/guide/engines.md cites each file): LMDeploy 0.18.0, vLLM 0.33.0, SGLang
0.5.23; the conformance suite checks the route tables against the installed
source where it is present.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lmfleet.errors import ConfigError, EngineCapabilityError
from lmfleet.monitor.judge import Probe, health_answer, status_answer
from lmfleet.node.load import LMDEPLOY_METRICS, MetricNames

Params = list[tuple[str, str]]
Answers = Sequence[tuple[int, bytes]]


@dataclass(frozen=True, slots=True)
class Command:
    """One control request: method, path, query and JSON body."""

    method: str
    path: str
    params: Params = field(default_factory=list)
    json: object = None


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """One engine's control surface; None where the engine has no such route.

    `health` are the paths asked every round (in one round trip, pipelined), and
    `read_health` turns their answers into a `Probe`: LMDeploy's `/health` says
    "sleeping" itself; vLLM's says 200 even asleep, so its `/is_sleeping` is asked
    beside it (present when the server runs with `VLLM_SERVER_DEV_MODE=1`, the
    only way it can sleep at all). SGLang's `/health` generates a token and waits
    at least a second for it (`SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION`, on by
    default), so its `/ready` is asked instead (200 once up and not paused, 503
    otherwise); no SGLang route says it is asleep, so its 200 is "up" and the
    fleet keeps what it last did to the node.
    """

    name: str
    title: str
    release: str
    """The release the routes were read from."""
    owned_by: str | None
    """`owned_by` of its `/v1/models` cards: how `attach` recognises it."""
    health: tuple[str, ...]
    read_health: Callable[[Answers], Probe]
    metrics: MetricNames | None
    models: str = "/v1/models"
    is_sleeping: str | None = None
    """A GET answering `{"is_sleeping": bool}`."""
    version: tuple[str, str] | None = None
    """(a GET, the field of its JSON answer) that names the engine's version."""
    sleep_path: str | None = None
    wake_path: str | None = None
    wake_tags: tuple[str, ...] = ()
    """The tags a full wakeup restores: a node woken with fewer still sleeps in part."""
    sleep_levels: tuple[int, ...] = (1, 2)
    terminate: str | None = None
    update_weights: str | None = None
    weights_backend: str | None = None
    """A GET that names the engine backend that would load pushed weights."""
    abort_path: str | None = None
    sleep_aborts: bool = True
    """Its sleep aborts what runs (LMDeploy's, vLLM's `mode=abort`); SGLang's refuses
    a busy server instead, so the fleet aborts first where it means to cut."""
    keeps_weights: tuple[str, str] | None = None
    """(a GET, a setting in its JSON answer, at any depth) that must be true for a
    level-1 sleep to keep the weights (SGLang drops the weights it releases unless
    started with `--enable-weights-cpu-backup`); None: level 1 always keeps them."""
    needs: str = ""
    """How to start the engine so that its control routes exist (the hint of a 404)."""

    # -- commands ----------------------------------------------------------------------

    def sleep(self, level: int) -> Command:
        path = self.route(self.sleep_path, "sleep")
        if level not in self.sleep_levels:
            levels = ", ".join(map(str, self.sleep_levels))
            raise EngineCapabilityError(self.title, f"sleep level {level} (it has {levels})")
        return Command("POST", path, [("level", str(level))])

    def wakeup(self, tags: Sequence[str] | None) -> Command:
        return Command(
            "POST", self.route(self.wake_path, "wake up"), [("tags", t) for t in tags or ()]
        )

    def abort(self, session_id: int | str | None) -> Command:
        """Abort one request by the engine's id for it (LMDeploy: its engine session;
        SGLang: its rid; vLLM: its request id) or, with None, every request."""
        path = self.route(self.abort_path, "abort requests")
        if isinstance(session_id, str):
            raise EngineCapabilityError(self.title, "abort one request by a string id")
        body = {"abort_all": True} if session_id is None else {"session_id": session_id}
        return Command("POST", path, json=body)

    def push(self, body: Mapping[str, object], version: int, *, first: bool) -> list[Command]:
        """The calls that load one bucket of pushed weights (`body` in LMDeploy's
        `UpdateParamsRequest` shape, `finished: true` on the last), `first`: the
        node's first bucket of this update. LMDeploy: the body to `/update_weights`."""
        return [Command("POST", self.route(self.update_weights, "load pushed weights"), json=body)]

    @property
    def kept_asleep(self) -> tuple[str, ...]:
        """What stays asleep while weights load: every tag but the weights."""
        return tuple(tag for tag in self.wake_tags if tag != "weights")

    def fully_awake(self, tags: Sequence[str] | None) -> bool:
        """Whether a wakeup with `tags` (None or empty: every tag) leaves nothing asleep."""
        return not tags or set(self.wake_tags) <= set(tags)

    def route(self, path: str | None, what: str) -> str:
        """`path`, or `EngineCapabilityError` when the engine has no route for `what`."""
        if path is None:
            raise EngineCapabilityError(self.title, what)
        return path


@dataclass(frozen=True, slots=True)
class VllmProfile(EngineProfile):
    """vLLM: sleep with a pause mode; `abort_requests` by request ids; weights through
    its weight-transfer routes."""

    def sleep(self, level: int) -> Command:
        command = EngineProfile.sleep(self, level)
        # "abort" is vLLM's default too; lmfleet drains before it sleeps a node.
        return Command(command.method, command.path, [*command.params, ("mode", "abort")])

    def abort(self, session_id: int | str | None) -> Command:
        path = self.route(self.abort_path, "abort requests")
        if isinstance(session_id, int):
            raise EngineCapabilityError(
                self.title, "abort one request by LMDeploy session id (it aborts by request id)"
            )
        # No ids: every request in flight (vLLM's rl/online/api_router.py).
        return Command("POST", path, json={"request_ids": [session_id]} if session_id else {})

    def push(self, body: Mapping[str, object], version: int, *, first: bool) -> list[Command]:
        """vLLM's weight transfer: `/start_weight_update` before the first bucket,
        each bucket as `{"update_info": body}` to `/update_weights` (the body is the
        transfer engine's: NCCL names, dtypes and shapes, or IPC handles), then
        `/finish_weight_update` with the version after the last."""
        path = self.route(self.update_weights, "load pushed weights")
        info = {key: value for key, value in body.items() if key != "finished"}
        calls = [Command("POST", "/start_weight_update", json={})] if first else []
        calls.append(Command("POST", path, json={"update_info": info}))
        if body.get("finished"):
            calls.append(
                Command("POST", "/finish_weight_update", json={"weight_version": str(version)})
            )
        return calls


@dataclass(frozen=True, slots=True)
class SglangProfile(EngineProfile):
    """SGLang: memory released and resumed by tags in a JSON body, at any level."""

    def sleep(self, level: int) -> Command:
        path = self.route(self.sleep_path, "sleep")
        if level not in self.sleep_levels:
            raise EngineCapabilityError(self.title, f"sleep level {level} (it has 1, 2)")
        return Command("POST", path, json={"tags": None})

    def wakeup(self, tags: Sequence[str] | None) -> Command:
        path = self.route(self.wake_path, "wake up")
        return Command("POST", path, json={"tags": list(tags) if tags else None})

    def abort(self, session_id: int | str | None) -> Command:
        path = self.route(self.abort_path, "abort requests")
        if isinstance(session_id, int):
            raise EngineCapabilityError(
                self.title, "abort one request by LMDeploy session id (it aborts by rid)"
            )
        body = {"abort_all": True} if session_id is None else {"rid": session_id}
        return Command("POST", path, json=body)

    def push(self, body: Mapping[str, object], version: int, *, first: bool) -> list[Command]:
        """SGLang's `/update_weights_from_tensor`: the serialized tensors as a list
        (one per tensor-parallel rank), loaded as they come; the last bucket names
        the version (`weight_version`, which SGLang then reports)."""
        path = self.route(self.update_weights, "load pushed weights")
        tensors = body.get(WEIGHTS_FIELD)
        sent: dict[str, object] = {
            WEIGHTS_FIELD: [tensors] if isinstance(tensors, str) else tensors,
            "flush_cache": True,
        }
        if body.get("load_format") is not None:
            sent["load_format"] = body["load_format"]
        if body.get("finished"):
            sent["weight_version"] = str(version)
        return [Command("POST", path, json=sent)]


WEIGHTS_FIELD = "serialized_named_tensors"
"""The bucket's tensors, in LMDeploy's `UpdateParamsRequest` and SGLang's
`UpdateWeightsFromTensorReqInput` alike."""


def _vllm_health(answers: Answers) -> Probe:
    """`/health` (200, or 503 when the engine died; empty bodies) and `/is_sleeping`
    (404 without dev mode: such a server cannot sleep)."""
    status, _ = answers[0]
    if status != 200:
        return Probe("unhealthy", f"HTTP {status}")
    if len(answers) > 1 and answers[1][0] == 200:
        try:
            asleep = json.loads(answers[1][1]).get("is_sleeping")
        except (ValueError, AttributeError):
            asleep = None
        if asleep is True:
            return Probe("sleeping", "asleep (/is_sleeping)")
    return Probe("healthy", "HTTP 200")


def _lmdeploy_health(answers: Answers) -> Probe:
    return health_answer(*answers[0])


def _up_health(answers: Answers) -> Probe:
    return status_answer(*answers[0])


LMDEPLOY = EngineProfile(
    name="lmdeploy",
    title="LMDeploy",
    release="0.18.0",
    owned_by="lmdeploy",
    health=("/health",),
    read_health=_lmdeploy_health,
    metrics=LMDEPLOY_METRICS,
    is_sleeping="/is_sleeping",
    sleep_path="/sleep",
    wake_path="/wakeup",
    wake_tags=("weights", "kv_cache"),
    terminate="/terminate",
    update_weights="/update_weights",
    weights_backend="/update_weights_from_ipc",
    abort_path="/abort_request",
    needs="--enable-abort-handling for /abort_request",
)
"""LMDeploy 0.18's `api_server` (lmdeploy/serve/openai/endpoints/management.py)."""

VLLM = VllmProfile(
    name="vllm",
    title="vLLM",
    release="0.33.0",
    owned_by="vllm",
    health=("/health", "/is_sleeping"),
    read_health=_vllm_health,
    metrics=MetricNames(
        "vllm:",
        {
            "running": "num_requests_running",
            "waiting": "num_requests_waiting",
            "cache_usage": "kv_cache_usage_perc",
            "prompt_tokens": "prompt_tokens_total",
            "generation_tokens": "generation_tokens_total",
        },
    ),
    is_sleeping="/is_sleeping",
    version=("/version", "version"),
    sleep_path="/sleep",
    wake_path="/wake_up",
    wake_tags=("weights", "kv_cache"),
    update_weights="/update_weights",
    abort_path="/abort_requests",
    needs="VLLM_SERVER_DEV_MODE=1 in its environment and --enable-sleep-mode",
)
"""vLLM 0.33's OpenAI server (vllm/entrypoints/serve/dev/sleep/api_router.py,
vllm/entrypoints/rl/online/api_router.py: both only with `VLLM_SERVER_DEV_MODE=1`)."""

SGLANG = SglangProfile(
    name="sglang",
    title="SGLang",
    release="0.5.23",
    owned_by="sglang",
    health=("/ready",),
    read_health=_up_health,
    metrics=MetricNames(
        "sglang:",
        {
            "running": "num_running_reqs",
            "waiting": "num_queue_reqs",
            "cache_usage": "token_usage",
            "prefix_hit_rate": "cache_hit_rate",
            "prompt_tokens": "prompt_tokens_total",
            "generation_tokens": "generation_tokens_total",
        },
    ),
    version=("/server_info", "version"),
    sleep_path="/release_memory_occupation",
    wake_path="/resume_memory_occupation",
    wake_tags=("kv_cache", "weights", "cuda_graph"),
    update_weights="/update_weights_from_tensor",
    abort_path="/abort_request",
    sleep_aborts=False,
    keeps_weights=("/server_info", "enable_weights_cpu_backup"),
    needs="--enable-memory-saver --enable-weights-cpu-backup (sleep) and --enable-metrics (load)",
)
"""SGLang 0.5.23's HTTP server (sglang/srt/entrypoints/http_server.py)."""

OPENAI = EngineProfile(
    name="openai",
    title="an OpenAI-compatible server",
    release="",
    owned_by=None,
    health=("/v1/models",),
    read_health=_up_health,
    metrics=None,
)
"""Any other OpenAI-compatible server: routing and health (its `/v1/models`) only."""

PROFILES: dict[str, EngineProfile] = {p.name: p for p in (LMDEPLOY, VLLM, SGLANG, OPENAI)}
ENGINES = tuple(PROFILES)
"""The engine names `engine=` accepts (besides "auto")."""


def profile_named(name: str | None) -> EngineProfile:
    """The profile of `name`; LMDeploy's for a node whose engine is not known yet
    (its `/health` reader understands every engine's answer)."""
    return PROFILES[name] if name is not None else LMDEPLOY


def recognise(cards: object) -> EngineProfile:
    """The engine that answered `/v1/models` with `cards` (its JSON), by `owned_by`:
    "lmdeploy", "vllm" or "sglang"; anything else is a generic OpenAI server."""
    data = cards.get("data") if isinstance(cards, dict) else None
    owners = {c.get("owned_by") for c in data if isinstance(c, dict)} if data else set()
    for profile in (LMDEPLOY, VLLM, SGLANG):
        if profile.owned_by in owners:
            return profile
    return OPENAI


def parse_engine(value: str | None, where: str) -> str | None:
    """An `engine=` argument: a profile name, or None for "auto" (recognise it)."""
    if value is None or value == "auto":
        return None
    if value not in PROFILES:
        choices = ", ".join(("auto", *ENGINES))
        raise ConfigError(f"{where}: engine must be one of {choices}, not {value!r}")
    return value
