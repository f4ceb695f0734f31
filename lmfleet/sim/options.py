"""Every knob of one emulated node, as one frozen pydantic model.

The CLI builds a `SimOptions` from its arguments; tests build one directly and
hand it to `create_app`. Nothing here reads the environment. Each field with a
command-line flag declares it (`config.Flag`): `lmfleet sim` builds the flag, its
default and its help from the field; `section` puts it under the cost model's or
the fault injection's heading.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmfleet.config import Flag
from lmfleet.node.state import NodeRole

DEFAULT_MODEL = "internlm/internlm2_5-7b-chat"
DEFAULT_PORT = 23333  # LMDeploy's api_server default

Role = Literal["hybrid", "prefill", "decode"]
HealthFault = Literal["unhealthy", "initializing"]
Backend = Literal["turbomind", "pytorch"]
Executor = Literal["uni", "mp", "ray"]
LogprobsMode = Literal["raw_logits", "raw_logprobs"]

COST = "cost"
"""The `Flag.section` of the cost model's flags (and the output's)."""
FAULTS = "faults"
"""The `Flag.section` of the fault injection's flags."""


class SimOptions(BaseModel):
    """Options of one emulated LMDeploy api_server (see `lmfleet sim --help`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: Annotated[str, Flag("--host", ("--server-name",), help="bind address")] = "127.0.0.1"
    port: Annotated[
        int,
        Flag(
            "--port", ("--server-port",), help="bind port ({default}, LMDeploy's)", metavar="PORT"
        ),
    ] = DEFAULT_PORT
    model: Annotated[str, Flag("--model", help="model path/name the node serves")] = DEFAULT_MODEL
    served_model_name: Annotated[
        str | None,
        Flag(
            "--served-model-name",
            ("--model-name",),
            help="name clients send",
            absent="default: --model",
        ),
    ] = None
    api_keys: Annotated[
        tuple[str, ...],
        Flag(
            "--api-keys",
            help="require Bearer KEY",
            metavar="KEY",
            absent="default: no key needed",
        ),
    ] = ()
    record_headers: Annotated[
        tuple[str, ...],
        Flag(
            "--record-headers",
            help="count each value of these request headers in /sim/stats' headers (tests "
            "check what reached which node)",
            metavar="NAME",
            absent="default: none",
        ),
    ] = ()
    proxy_url: Annotated[
        str | None,
        Flag(
            "--proxy-url",
            help="register at PROXY/nodes/add on start-up, once",
            absent="default: register nowhere",
        ),
    ] = None
    role: Annotated[
        Role,
        Flag("--role", help="DistServe role announced at /nodes/add", parse=str.lower),
    ] = "hybrid"
    engine: Annotated[
        Literal["lmdeploy", "vllm", "sglang"],
        Flag(
            "--engine",
            help="whose HTTP surface to speak (routes, answers, /metrics names, sleep): "
            "LMDeploy 0.18, vLLM 0.33 or SGLang 0.5.23 {default}",
            parse=str.lower,
        ),
    ] = "lmdeploy"
    dev_mode: Annotated[
        bool,
        Flag(
            "--no-dev-mode",
            help="vLLM without VLLM_SERVER_DEV_MODE=1: no /sleep, /wake_up, /is_sleeping, "
            "/abort_requests",
        ),
    ] = True
    weights_cpu_backup: Annotated[
        bool,
        Flag(
            "--no-weights-cpu-backup",
            help="SGLang without --enable-weights-cpu-backup (its /server_info says so)",
        ),
    ] = True
    allow_terminate_by_client: Annotated[
        bool,
        Flag(
            "--allow-terminate-by-client",
            help="answer POST /terminate by exiting (as LMDeploy's flag)",
        ),
    ] = False
    enable_abort_handling: Annotated[
        bool,
        Flag(
            "--enable-abort-handling",
            help="serve POST /abort_request (else 501, as LMDeploy)",
        ),
    ] = False
    # LMDeploy 0.18 serves /metrics unless --disable-metrics
    enable_metrics: Annotated[
        bool, Flag("--disable-metrics", help="no /metrics (as LMDeploy's flag)")
    ] = True
    # LMDEPLOY_HEALTH_POLL_INTERVAL's default; 0 means /health is computed live.
    # The CLI reads the variable when the flag is left out (lmfleet/sim/cli.py).
    health_poll_interval: Annotated[
        float,
        Flag(
            "--health-poll-interval",
            help="seconds /health may lag the engine, 0 = live",
            absent="default {value}: LMDEPLOY_HEALTH_POLL_INTERVAL when set, as LMDeploy reads it",
        ),
    ] = Field(default=12.0, ge=0)
    log_level: Annotated[str, Flag("--log-level", help="{default}", parse=str.lower)] = "warning"
    # LMDeploy's engine choice decides which weight-update routes work (lmfleet/sim/weights.py).
    backend: Annotated[
        Backend,
        Flag(
            "--backend",
            help="engine emulated ({default}, LMDeploy's); decides the weight-update routes",
        ),
    ] = "turbomind"  # api_server's default
    # None: LMDeploy picks (see executor)
    distributed_executor_backend: Annotated[
        Executor | None,
        Flag(
            "--distributed-executor-backend",
            help="pytorch executor; LMDeploy 0.18 loads pushed weights only with ray",
            absent="default: uni",
        ),
    ] = None
    # PyTorch engine: logprobs are refused (400) unless set; turbomind ignores it and
    # always serves them (its config has no logprobs_mode). See logprobs.py.
    logprobs_mode: Annotated[
        LogprobsMode | None,
        Flag(
            "--logprobs-mode",
            help="pytorch: serve logprobs ({default}); turbomind always serves them",
            absent="default: none, so refused with a 400 as LMDeploy does",
        ),
    ] = None

    # Cost model (milliseconds on a speed-1.0 node; see engine.CostModel).
    fast: Annotated[bool, Flag("--fast", help="no sleeps, no scheduler", section=COST)] = False
    speed: Annotated[
        float, Flag("--speed", help="0.333 = 3x slower", metavar="FACTOR", section=COST)
    ] = Field(default=1.0, gt=0)
    ttft_ms: Annotated[
        float, Flag("--ttft-ms", help="time to the first token", metavar="MS", section=COST)
    ] = Field(default=40.0, ge=0)
    prefill_ms_per_token: Annotated[
        float,
        Flag(
            "--prefill-ms-per-token",
            help="prefill time per uncached prompt token",
            metavar="MS",
            section=COST,
        ),
    ] = Field(default=0.1, ge=0)
    tpot_ms: Annotated[
        float,
        Flag(
            "--tpot-ms",
            help="time per output token of one sequence",
            metavar="MS",
            section=COST,
        ),
    ] = Field(default=20.0, ge=0)
    batch_slowdown: Annotated[
        float,
        Flag(
            "--batch-slowdown",
            help="per-token time grows by this fraction per extra running sequence",
            metavar="FRACTION",
            section=COST,
        ),
    ] = Field(default=0.02, ge=0)
    max_batch: Annotated[
        int,
        Flag("--max-batch", help="sequences decoded at once; more wait", section=COST),
    ] = Field(default=64, ge=1)
    prefix_cache_blocks: Annotated[
        int,
        Flag("--prefix-cache-blocks", help="prefix cache size in blocks", section=COST),
    ] = Field(default=4096, ge=0)
    # A finished weight update takes weights_gb * update_seconds_per_gb seconds.
    weights_gb: Annotated[
        float,
        Flag(
            "--weights-gb",
            help="model size for the weight-update cost",
            metavar="GB",
            section=COST,
        ),
    ] = Field(default=16.0, ge=0)
    update_seconds_per_gb: Annotated[
        float,
        Flag(
            "--update-seconds-per-gb",
            help="a finished weight update takes weights-gb times this (server stays "
            "responsive; {default})",
            section=COST,
        ),
    ] = Field(default=0.0, ge=0)

    # Output.
    seed: Annotated[
        int, Flag("--seed", help="seed of the generated text and faults", section=COST)
    ] = 0
    output_tokens: Annotated[
        int,
        Flag(
            "--output-tokens",
            help="natural output length when max_tokens allows it",
            section=COST,
        ),
    ] = Field(default=16, ge=1)
    output_tokens_max: Annotated[
        int | None,
        Flag(
            "--output-tokens-max",
            help="vary the natural length in [output-tokens, this] by prompt hash",
            absent="default: no variation",
            section=COST,
        ),
    ] = Field(default=None, ge=1)

    # Fault injection (all also settable at run time through POST /sim/faults).
    startup_delay: Annotated[
        float,
        Flag("--startup-delay", help="seconds before the port opens", section=FAULTS),
    ] = Field(default=0.0, ge=0)
    initializing_for: Annotated[
        float,
        Flag(
            "--initializing-for",
            help="seconds /health says initializing (503) after start",
            section=FAULTS,
        ),
    ] = Field(default=0.0, ge=0)
    error_rate: Annotated[
        float,
        Flag(
            "--error-rate",
            help="fraction of inference requests answered with --error-status",
            metavar="FRACTION",
            section=FAULTS,
        ),
    ] = Field(default=0.0, ge=0, le=1)
    error_status: Annotated[
        int,
        Flag(
            "--error-status",
            help="status of the injected errors",
            choices=(500, 502, 503, 504),
            section=FAULTS,
        ),
    ] = 500
    hang: Annotated[bool, Flag("--hang", help="inference never answers", section=FAULTS)] = False
    hang_after_head: Annotated[
        bool,
        Flag(
            "--hang-after-head",
            help="inference sends a 200 event-stream head, then nothing (a wedged engine)",
            section=FAULTS,
        ),
    ] = False
    hang_health: Annotated[
        bool, Flag("--hang-health", help="/health never answers", section=FAULTS)
    ] = False
    crash_after: Annotated[
        int | None,
        Flag(
            "--crash-after",
            help="serve N inference requests, then exit hard on the next",
            absent="default: never",
            section=FAULTS,
        ),
    ] = Field(default=None, ge=0)
    drop_stream_after: Annotated[
        int | None,
        Flag(
            "--drop-stream-after",
            help="cut streams after K chunks, without [DONE]",
            metavar="K",
            absent="default: never",
            section=FAULTS,
        ),
    ] = Field(default=None, ge=0)
    stall_stream_after: Annotated[
        int | None,
        Flag(
            "--stall-stream-after",
            help="streams go silent after K chunks (a hung engine), until the client goes",
            metavar="K",
            absent="default: never",
            section=FAULTS,
        ),
    ] = Field(default=None, ge=0)
    health_fault: Annotated[
        HealthFault | None,
        Flag("--unhealthy", help="/health says unhealthy", const="unhealthy", section=FAULTS),
    ] = None
    update_weights_error: Annotated[
        int | None,
        Flag(
            "--update-weights-error",
            help="/update_weights and /update_weights_from_distributed fail with STATUS",
            metavar="STATUS",
            absent="default: they succeed",
            section=FAULTS,
        ),
    ] = Field(default=None, ge=400, le=599)

    @property
    def model_name(self) -> str:
        """The name clients must send (LMDeploy's `--model-name` wins over the path)."""
        return self.served_model_name or self.model

    @property
    def is_fast(self) -> bool:
        """No sleeps and no scheduler: `--fast`, or both TTFT and TPOT set to 0."""
        return self.fast or (self.ttft_ms == 0 and self.tpot_ms == 0)

    @property
    def executor(self) -> Executor:
        """The PyTorch engine's executor as LMDeploy resolves `None`: "uni" for one
        worker (the sim is one GPU, tp=1); LMDeploy picks "ray" only for tp*dp > 1."""
        return self.distributed_executor_backend or "uni"

    @property
    def update_seconds(self) -> float:
        """How long finishing a weight update takes (the whole model is reloaded)."""
        return self.weights_gb * self.update_seconds_per_gb

    @property
    def role_id(self) -> int:
        """LMDeploy's EngineRole number sent in `/nodes/add`."""
        return int(NodeRole[self.role.upper()])
