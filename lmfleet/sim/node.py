"""The mutable state of one emulated node: sleep tags, health snapshot, in-flight, stats.

All of it lives in one object owned by the app (no module globals), touched only
from the event loop thread, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass, field, fields
from typing import Any

from lmfleet.sim.distserve import SimDistServe
from lmfleet.sim.engine import CostModel, PrefixCache, Scheduler
from lmfleet.sim.faults import Faults
from lmfleet.sim.options import SimOptions
from lmfleet.sim.weights import WeightLedger

SLEEP_TAGS = ("weights", "kv_cache")
_HEALTH_MESSAGES = {
    "healthy": "Engine is healthy.",
    "sleeping": "Engine is sleeping.",
    "unhealthy": "Engine health probe failed (injected by lmfleet sim).",
    "initializing": "Engine health monitor is starting.",
}


@dataclass(eq=False)
class Sequence:
    """One in-flight inference request; `aborted` is polled between decode steps."""

    session_id: int
    aborted: bool = False
    streaming: bool = False  # a streamed response that has sent its first chunk


@dataclass
class Stats:
    """Counters readable at GET /sim/stats: which node served what."""

    requests_total: int = 0
    by_path: Counter[str] = field(default_factory=Counter)
    headers: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    """Requests seen with each value of each `--record-headers` header."""
    inflight: int = 0
    streaming: int = 0  # of those, streamed responses past their first chunk
    max_inflight: int = 0
    completed: int = 0
    aborted: int = 0
    errors_injected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0  # counted per decode step, as LMDeploy's metrics count them
    models_answered: int = 0  # `/v1/models` answers sent (a delayed one counts once sent)

    def reset(self) -> None:
        """Zero every counter except what is in flight right now."""
        inflight, streaming = self.inflight, self.streaming
        fresh = Stats()
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))
        self.inflight = self.max_inflight = inflight
        self.streaming = streaming


class NodeRuntime:
    """Everything a request handler reads or changes on the node."""

    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.model_name = options.model_name
        self.fast = options.is_fast
        self.cost = CostModel.from_ms(
            ttft_ms=options.ttft_ms,
            prefill_ms_per_token=options.prefill_ms_per_token,
            tpot_ms=options.tpot_ms,
            batch_slowdown=options.batch_slowdown,
            speed=options.speed,
        )
        self.scheduler = Scheduler(options.max_batch)
        self.prefix_cache = PrefixCache(options.prefix_cache_blocks)
        self.faults = Faults.from_options(options)
        self.distserve = SimDistServe(options)
        self.stats = Stats()
        self.weights = WeightLedger()
        self.sleeping_tags: set[str] = set()
        self.sleep_level = 0
        self._awake = asyncio.Event()
        self._awake.set()
        self.sequences: set[Sequence] = set()
        self.engine_requests: dict[str, int] = {}  # SGLang rid / vLLM request id -> session
        self.inference_requests = 0
        self.started = time.monotonic()
        self.created = int(time.time())
        self._snapshot: dict[str, str] = {
            "status": "initializing",
            "message": _HEALTH_MESSAGES["initializing"],
        }
        self._snapshot_at = float("-inf")

    # -- sleep ---------------------------------------------------------------

    @property
    def is_sleeping(self) -> bool:
        """Asleep while any tag (weights, kv_cache) is still asleep."""
        return bool(self.sleeping_tags)

    def sleep(self, level: int, tags: Iterable[str] = SLEEP_TAGS) -> None:
        """Put every tag to sleep, abort every in-flight request and drop the KV
        cache (so the prefix cache), as LMDeploy does (and vLLM's default "abort"
        mode; SGLang refuses unless idle, checked by its route)."""
        self.sleep_level = level
        self.sleeping_tags = set(tags)
        self._awake.clear()
        self.abort_all()
        self.prefix_cache.clear()

    def wake_tags(self, tags: Sequence_[str] | None) -> bool:
        """vLLM's and SGLang's wakeup: the given tags (all when none) are awake
        after, whatever else was; whether nothing sleeps any more."""
        if tags:
            self.sleeping_tags.difference_update(tags)
        else:
            self.sleeping_tags.clear()
        if not self.sleeping_tags:
            self.sleep_level = 0
            self._awake.set()
        return not self.sleeping_tags

    async def until_awake(self) -> None:
        """Return once nothing sleeps: vLLM queues a request sent to a sleeping
        engine (its scheduler is paused) and runs it after the wakeup."""
        await self._awake.wait()

    @property
    def serving(self) -> bool:
        """The KV cache is awake: requests can run (LMDeploy's wakeup of kv_cache)."""
        return "kv_cache" not in self.sleeping_tags

    def wakeup(self, tags: list[str]) -> None:
        """Wake the given tags (all when none are given).

        As LMDeploy's AsyncEngine.wakeup: when any given tag is not asleep (unknown,
        or already awake) the whole call is a logged no-op, so `tags=weights&tags=
        kv_cache` wakes nothing once `weights` is awake.
        """
        if any(tag not in self.sleeping_tags for tag in tags):
            return
        self.wake_tags(tags)

    def abort_all(self) -> None:
        for seq in self.sequences:
            seq.aborted = True
        self.scheduler.abort_waiting()

    def abort_session(self, session_id: int) -> bool:
        found = False
        for seq in self.sequences:
            if seq.session_id == session_id:
                seq.aborted = found = True
        return found

    # -- health --------------------------------------------------------------

    def live_health(self) -> str:
        """What a probe of the engine would say right now."""
        if time.monotonic() - self.started < self.options.initializing_for:
            return "initializing"
        return "sleeping" if self.is_sleeping else "healthy"

    def health(self) -> dict[str, str]:
        """LMDeploy's /health: a snapshot refreshed at most every poll interval.

        Emulated lazily (refreshed when read and older than the interval) rather
        than by a timer, so the lag after /sleep is deterministic for tests: a read
        right after a read still returns the old status. An injected health fault
        shows at once (a real unhealthy snapshot also triggers a re-probe).
        """
        fault = self.faults.health
        if fault is not None:
            return {"status": fault, "message": _HEALTH_MESSAGES[fault]}
        now = time.monotonic()
        if now - self._snapshot_at >= self.options.health_poll_interval:
            status = self.live_health()
            self._snapshot = {"status": status, "message": _HEALTH_MESSAGES[status]}
            self._snapshot_at = now
        return self._snapshot

    # -- accounting ----------------------------------------------------------

    def begin(self, session_id: int) -> Sequence:
        seq = Sequence(session_id)
        self.sequences.add(seq)
        stats = self.stats
        stats.inflight += 1
        stats.max_inflight = max(stats.max_inflight, stats.inflight)
        return seq

    def first_chunk_sent(self, seq: Sequence) -> None:
        seq.streaming = True
        self.stats.streaming += 1

    def end(
        self, seq: Sequence, prompt_tokens: int, completion_tokens: int, *, aborted: bool
    ) -> None:
        self.sequences.discard(seq)
        stats = self.stats
        stats.inflight -= 1
        stats.streaming -= seq.streaming
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += completion_tokens
        if aborted:
            stats.aborted += 1
        else:
            stats.completed += 1

    def stats_json(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "requests_total": stats.requests_total,
            "by_path": dict(stats.by_path),
            "headers": {name: dict(values) for name, values in stats.headers.items()},
            "inflight": stats.inflight,
            "streaming": stats.streaming,
            "max_inflight": stats.max_inflight,
            "completed": stats.completed,
            "aborted": stats.aborted,
            "errors_injected": stats.errors_injected,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "cached_tokens": stats.cached_tokens,
            "generated_tokens": stats.generated_tokens,
            "models_answered": stats.models_answered,
            "running": self.scheduler.running,
            "waiting": self.scheduler.waiting,
            "sleeping": self.is_sleeping,
            "port": self.options.port,
            "model": self.model_name,
            "distserve": self.distserve.stats(),
            "weights": self.weights.to_json(),
            "admin_calls": list(self.weights.admin_calls),
        }
