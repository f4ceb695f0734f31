"""A stand-in for LMDeploy's PyTorch engine: deterministic tokens, no model.

Only the engine is replaced. `patch()` swaps `AsyncEngine._build_pytorch` (the
one method where lmdeploy 0.18.0's `AsyncEngine.__init__` builds
`lmdeploy.pytorch.engine.Engine`) for a function returning `StubEngine`. Everything
above it is LMDeploy's own code: the CLI, `serve()`, FastAPI routes, middlewares
(auth, sleep gate), the health monitor, `--proxy-url` registration, AsyncEngine,
the session manager, tokenizer and chat template, request validation.

The stub implements the surface AsyncEngine and the server touch:
`engine_config`, `create_instance()`, `start_loop()`, `get_health_status()`,
`get_schedule_metrics()`, `sleep()`, `wakeup()`, `complete_weights_update()`,
`end_session()`, `close()`; and per instance `async_stream_infer()` (an async
generator of `EngineOutput`), `async_cancel()`, `async_end()`.

Weight updates behave as 0.18's engine over its executor (`engine_config.
distributed_executor_backend`, None meaning "uni" for one GPU): `update_params()`
and the NCCL group calls raise NotImplementedError except on "ray" (where the
groups are bookkept as the model agent does, without NCCL); the checkpoint-engine
calls report one worker (rank 0) and import `checkpoint_engine` for real, so on a
peer without it they fail with the model agent's own messages.

Output: `STUB_OUTPUT_TOKENS` tokens (default 16), then EOS (finish_reason
"stop"); fewer when `max_new_tokens` is smaller ("length"); with `ignore_eos`
exactly `max_new_tokens` ("length"). One token every
`STUB_TOKEN_INTERVAL` seconds (default 0.01). A cancelled request (client abort,
`/sleep`, `/abort_request`) ends with `ResponseType.CANCEL` ("abort").

Logprobs (`gen_config.logprobs = n`, set by the server from the request): each
output carries one row per new token in the PyTorch engine's form
(`engine_loop._update_logprobs`): a dict {token_id: logprob} built from
[chosen, top-1 .. top-n] (`compute_logprobs` puts the chosen token first, then
`_torch_topk`), so the chosen token is first and, being the greedy top-1 here,
appears once: n entries. With `logprob_start_len >= 0` (`/generate`'s input
logprobs, `max_new_tokens=0`) nothing is generated: one FINISH output carries the
rows of the prompt, one per token of `input_ids[logprob_start_len + 1:]`, each
{target: logprob, top-1 .. top-n} (the target is top-1 every third position).
The server turns these rows into its responses with its own code.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import zlib
from typing import Any

from lmdeploy.messages import EngineOutput, ResponseType, ScheduleMetrics

EOS_ID = 2
FIRST_WORD_ID = 3  # ids below are <unk>, <s>, </s> (see make_model.py)


class StubEngine:
    """What AsyncEngine calls on `self.engine`."""

    is_dummy = False  # register_to_proxy skips dummy engines

    def __init__(self, engine_config: Any, vocab_size: int) -> None:
        self.engine_config = engine_config
        self.vocab_size = vocab_size
        self.output_tokens = int(os.environ.get("STUB_OUTPUT_TOKENS", "16"))
        self.interval = float(os.environ.get("STUB_TOKEN_INTERVAL", "0.01"))
        self.metrics = ScheduleMetrics()
        self.asleep = False
        self.groups: set[str] = set()

    # -- engine --------------------------------------------------------------
    def create_instance(self, cuda_stream_id: int = 0) -> StubInstance:
        return StubInstance(self)

    def start_loop(self) -> bool:
        return True

    async def get_health_status(self) -> dict[str, Any]:
        return dict(
            alive=True,
            message="PyTorch engine is healthy.",
            schedule_metrics=self.get_schedule_metrics(),
        )

    def get_schedule_metrics(self) -> ScheduleMetrics:
        self.metrics.scheduler_tick += 1  # an idle real scheduler still ticks
        return self.metrics

    async def sleep(self, level: int = 1) -> None:
        self.asleep = True

    def wakeup(self, tags: list[str] | None = None) -> None:
        self.asleep = False

    def complete_weights_update(self) -> None:
        pass

    # -- weight updates (pytorch/engine/engine.py over executor/*.py) ---------
    @property
    def executor(self) -> str:
        return getattr(self.engine_config, "distributed_executor_backend", None) or "uni"

    def _require_ray(self) -> None:
        """ExecutorBase's default for what only RayExecutor implements."""
        if self.executor != "ray":
            raise NotImplementedError("Not Implemented.")

    def _reduce(self, ok: bool, message: str, op: str) -> tuple[bool, str]:
        """One worker's answer as mp/ray executors reduce it (uni passes it through)."""
        if ok or self.executor == "uni":
            return ok, message
        return False, f"{op}: rank0: {message}"

    def update_params(self, request: Any) -> None:
        self._require_ray()

    async def get_checkpoint_engine_status(self) -> list[dict[str, Any]]:
        """ModelAgent.get_checkpoint_engine_status of the one worker (no CUDA here)."""
        version, message = None, "checkpoint-engine worker is ready."
        try:
            module = importlib.import_module("checkpoint_engine")
            importlib.import_module("checkpoint_engine.worker")
            version = str(getattr(module, "__version__", "unknown"))
        except Exception as exc:  # noqa: BLE001 - the model agent catches everything
            message = f"checkpoint-engine is unavailable; install 'checkpoint-engine==0.4.2': {exc}"
        return [
            {
                "ready": version is not None,
                "message": message,
                "checkpoint_engine_version": version,
                "device_uuid": "GPU-00000000-0000-0000-0000-000000000000",
                "weight_devices": ["cuda"],
                "rank": 0,
            }
        ]

    async def update_weights_from_ipc(
        self, request: Any, reject_reason: str | None = None
    ) -> tuple[bool, str]:
        try:
            importlib.import_module("zmq")
            importlib.import_module("checkpoint_engine.worker")
            raise RuntimeError(reject_reason or "the stub engine cannot receive CUDA IPC")
        except Exception as exc:  # noqa: BLE001 - the model agent catches everything
            message = (
                f"Failed to update weights from checkpoint-engine IPC: {exc}. "
                "The model weights may be partially updated; discard this instance and "
                "reload it."
            )
        return self._reduce(False, message, "update_weights_from_ipc")

    async def init_weights_update_group(self, request: Any) -> tuple[bool, str]:
        self._require_ray()
        name = request.group_name
        if not name:
            return self._reduce(False, "group_name cannot be empty", "init_weights_update_group")
        if name in self.groups:
            message = f"group {name!r} already initialized"
            return self._reduce(False, message, "init_weights_update_group")
        self.groups.add(name)
        return True, "Succeeded to initialize weights update group."

    async def update_weights_from_distributed(self, request: Any) -> tuple[bool, str]:
        self._require_ray()
        name = request.group_name
        if name not in self.groups:
            message = f"group {name!r} not initialized. Call init_weights_update_group first."
            return self._reduce(False, message, "update_weights_from_distributed")
        return True, "Succeeded to update parameter online."

    async def destroy_weights_update_group(self, request: Any) -> tuple[bool, str]:
        self._require_ray()
        name = request.group_name
        if name not in self.groups:
            message = f"group {name!r} not initialized"
            return self._reduce(False, message, "destroy_weights_update_group")
        self.groups.discard(name)
        return True, f"Succeeded to destroy group {name!r}."

    def end_session(self, session_id: int) -> bool:
        return True

    def close(self) -> None:
        pass


class StubInstance:
    """One request handle from the pool (`RequestHandlePool`)."""

    def __init__(self, engine: StubEngine) -> None:
        self.engine = engine
        self.cancelled: set[int] = set()

    async def async_stream_infer(
        self, session_id: int, input_ids: list[int], gen_config: Any = None, **kwargs: Any
    ):
        engine = self.engine
        self.cancelled.discard(session_id)
        num_logprobs = getattr(gen_config, "logprobs", None) or 0
        start = getattr(gen_config, "logprob_start_len", -1)
        if start is not None and start >= 0:  # scoring only: the prompt's rows, no output
            await asyncio.sleep(engine.interval)
            targets = input_ids[start + 1 :]
            rows = [self._row(t, i, num_logprobs, i % 3 == 0) for i, t in enumerate(targets)]
            yield EngineOutput(ResponseType.FINISH, [], logprobs=rows)
            return
        limit = getattr(gen_config, "max_new_tokens", None) or engine.output_tokens + 1
        ignore_eos = bool(getattr(gen_config, "ignore_eos", False))
        natural = limit if ignore_eos else min(limit, engine.output_tokens)
        seed = zlib.crc32(bytes(str(input_ids), "ascii"))
        words = engine.vocab_size - FIRST_WORD_ID
        ids = [FIRST_WORD_ID + (seed + 7 * i) % words for i in range(natural)]
        if not ignore_eos:
            ids.append(EOS_ID)  # finish_reason "stop" (cut below when max_new_tokens is hit)
        ids = ids[:limit]
        engine.metrics.active_seqs += 1
        try:
            for i, token in enumerate(ids):
                await asyncio.sleep(engine.interval)  # emulated time per token
                if session_id in self.cancelled:
                    yield EngineOutput(ResponseType.CANCEL, [])
                    return
                last = i == len(ids) - 1
                status = ResponseType.FINISH if last else ResponseType.SUCCESS
                rows = [self._row(token, i, num_logprobs, True)] if num_logprobs > 0 else None
                yield EngineOutput(status, [token], logprobs=rows)
        finally:
            engine.metrics.active_seqs -= 1
            engine.metrics.scheduler_tick += 1

    def _row(self, token: int, position: int, n: int, top: bool) -> dict[int, float]:
        """One position's logprobs as the PyTorch engine hands them over: {chosen, top-k}.

        `compute_logprobs` concatenates [chosen, top-1 .. top-n] (values descending);
        `dict(zip(indices, vals))` keeps the chosen token first and drops its repeat
        when it is also in the top n (`top`: it is the top-1).
        """
        words = self.engine.vocab_size - FIRST_WORD_ID
        alternatives = [
            FIRST_WORD_ID + (token - FIRST_WORD_ID + 1 + k + position) % words for k in range(n)
        ]
        others = [t for t in alternatives if t != token]
        ranked = [token, *others][:n] if top else others[:n]
        values = {t: -0.25 - 0.5 * r for r, t in enumerate(ranked)}
        chosen = values.get(token, -0.25 - 0.5 * n)
        return dict([(token, chosen), *values.items()][: n + 1])

    async def async_cancel(self, session_id: int) -> None:
        self.cancelled.add(session_id)

    async def async_end(self, session_id: int) -> None:
        pass

    def cancel(self, session_id: int) -> None:
        self.cancelled.add(session_id)

    def end(self, session_id: int) -> None:
        pass


def patch() -> None:
    """Make every AsyncEngine build a StubEngine instead of the PyTorch engine."""
    from lmdeploy.serve.core.async_engine import AsyncEngine

    def _build_pytorch(
        self: Any,
        model_path: str,
        backend_config: Any = None,
        speculative_config: Any = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> StubEngine:
        return StubEngine(backend_config, int(self.hf_cfg.vocab_size))

    AsyncEngine._build_pytorch = _build_pytorch
