"""Every knob of one emulated node, as one frozen pydantic model.

The CLI builds a `SimOptions` from its arguments; tests build one directly and
hand it to `create_app`. Nothing here reads the environment.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lmfleet.node.state import NodeRole

DEFAULT_MODEL = "internlm/internlm2_5-7b-chat"
DEFAULT_PORT = 23333  # LMDeploy's api_server default

Role = Literal["hybrid", "prefill", "decode"]
HealthFault = Literal["unhealthy", "initializing"]
Backend = Literal["turbomind", "pytorch"]
Executor = Literal["uni", "mp", "ray"]
LogprobsMode = Literal["raw_logits", "raw_logprobs"]


class SimOptions(BaseModel):
    """Options of one emulated LMDeploy api_server (see `lmfleet sim --help`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    api_keys: tuple[str, ...] = ()
    proxy_url: str | None = None
    role: Role = "hybrid"
    allow_terminate_by_client: bool = False
    enable_abort_handling: bool = False
    enable_metrics: bool = True  # LMDeploy 0.18 serves /metrics unless --disable-metrics
    # LMDEPLOY_HEALTH_POLL_INTERVAL's default; 0 means /health is computed live.
    health_poll_interval: float = Field(default=12.0, ge=0)
    log_level: str = "warning"
    # LMDeploy's engine choice decides which weight-update routes work (lmfleet/sim/weights.py).
    backend: Backend = "turbomind"  # api_server's default
    distributed_executor_backend: Executor | None = None  # None: LMDeploy picks (see executor)
    # PyTorch engine: logprobs are refused (400) unless set; turbomind ignores it and
    # always serves them (its config has no logprobs_mode). See logprobs.py.
    logprobs_mode: LogprobsMode | None = None

    # Cost model (milliseconds on a speed-1.0 node; see engine.CostModel).
    fast: bool = False
    speed: float = Field(default=1.0, gt=0)
    ttft_ms: float = Field(default=40.0, ge=0)
    prefill_ms_per_token: float = Field(default=0.1, ge=0)
    tpot_ms: float = Field(default=20.0, ge=0)
    batch_slowdown: float = Field(default=0.02, ge=0)
    max_batch: int = Field(default=64, ge=1)
    prefix_cache_blocks: int = Field(default=4096, ge=0)
    # A finished weight update takes weights_gb * update_seconds_per_gb seconds.
    weights_gb: float = Field(default=16.0, ge=0)
    update_seconds_per_gb: float = Field(default=0.0, ge=0)

    # Output.
    seed: int = 0
    output_tokens: int = Field(default=16, ge=1)
    output_tokens_max: int | None = Field(default=None, ge=1)

    # Fault injection (all also settable at run time through POST /sim/faults).
    startup_delay: float = Field(default=0.0, ge=0)
    initializing_for: float = Field(default=0.0, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    error_status: int = 500
    hang: bool = False
    hang_after_head: bool = False
    hang_health: bool = False
    crash_after: int | None = Field(default=None, ge=0)
    drop_stream_after: int | None = Field(default=None, ge=0)
    health_fault: HealthFault | None = None
    update_weights_error: int | None = Field(default=None, ge=400, le=599)

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
