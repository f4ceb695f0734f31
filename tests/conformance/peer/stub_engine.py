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
`update_params()`, `end_session()`, `close()`; and per instance
`async_stream_infer()` (an async generator of `EngineOutput`), `async_cancel()`,
`async_end()`.

Output: `STUB_OUTPUT_TOKENS` tokens (default 16), then EOS (finish_reason
"stop"); fewer when `max_new_tokens` is smaller ("length"); with `ignore_eos`
exactly `max_new_tokens` ("length"). One token every
`STUB_TOKEN_INTERVAL` seconds (default 0.01). A cancelled request (client abort,
`/sleep`, `/abort_request`) ends with `ResponseType.CANCEL` ("abort").
"""

from __future__ import annotations

import asyncio
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

    def update_params(self, request: Any) -> None:
        pass

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
                yield EngineOutput(ResponseType.FINISH if last else ResponseType.SUCCESS, [token])
        finally:
            engine.metrics.active_seqs -= 1
            engine.metrics.scheduler_tick += 1

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
