"""The cost model of an emulated GPU node: pure arithmetic plus a tiny scheduler.

Why a model at all: routing strategies only differ when nodes differ, so an
emulated node must get slower as it gets busier, the way a continuous-batching
engine does:

- up to `max_batch` sequences decode together; one more waits in a FIFO queue;
- time to first token = `ttft_ms + prefill_ms_per_token * uncached_prompt_tokens`;
- each decode step takes `tpot_ms * (1 + batch_slowdown * (running - 1))`, so the
  per-token time of every sequence grows with the running batch;
- recently seen prompt prefixes (64-character blocks) are cached, so a prompt that
  shares a long prefix with an earlier one pays less prefill;
- every time is divided by `speed` (`--speed 0.333` is a node 3x slower).

Simplification (documented, deliberate): each sequence paces itself with the
batch size it sees at each step, instead of one global step loop. That keeps the
scheduler a counter and a queue, and the effect routing cares about (busier node,
slower tokens) is the same.

`CostModel` and `PrefixCache` are pure and deterministic; `Scheduler` holds only
counters and waiters, and never sleeps itself.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass

# One prefix-cache block: 64 characters, i.e. 16 tokens by `count_tokens`.
BLOCK_CHARS = 64


def count_tokens(text: str) -> int:
    """Token count of `text`: one token per 4 characters, rounded up.

    Cheap, deterministic and monotone in length: good enough for usage numbers
    and the cost model, and the same rule everywhere in the simulator.
    """
    return (len(text) + 3) // 4


@dataclass(frozen=True, slots=True)
class CostModel:
    """Timings of one node, in seconds, already divided by its speed."""

    ttft: float = 0.040
    prefill_per_token: float = 0.0001
    tpot: float = 0.020
    batch_slowdown: float = 0.02

    @classmethod
    def from_ms(
        cls,
        *,
        ttft_ms: float,
        prefill_ms_per_token: float,
        tpot_ms: float,
        batch_slowdown: float,
        speed: float,
    ) -> CostModel:
        """Build from the CLI's milliseconds; a node with `speed` s is s times faster."""
        scale = 1.0 / (1000.0 * speed)
        return cls(
            ttft=ttft_ms * scale,
            prefill_per_token=prefill_ms_per_token * scale,
            tpot=tpot_ms * scale,
            batch_slowdown=batch_slowdown,
        )

    def prefill_seconds(self, prompt_tokens: int, cached_tokens: int = 0) -> float:
        """Time to first token for a prompt of which `cached_tokens` hit the prefix cache."""
        uncached = max(0, prompt_tokens - cached_tokens)
        return self.ttft + self.prefill_per_token * uncached

    def step_seconds(self, running: int) -> float:
        """Duration of one decode step while `running` sequences share the batch."""
        return self.tpot * (1.0 + self.batch_slowdown * max(0, running - 1))


class PrefixCache:
    """An LRU of prompt-prefix blocks, keyed by the hash of the whole prefix.

    A block matches only when every block before it matched too (the hash chains
    the prefix), as in a radix/paged KV cache. Capacity 0 disables the cache.
    """

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        """Forget every block: LMDeploy's sleep discards the KV cache, and a prefix
        cached under the old weights must not hit after a weight update."""
        self._blocks.clear()

    def lookup_and_insert(self, prompt: str) -> int:
        """Cached tokens for `prompt`; then remember all its full blocks."""
        if self.capacity == 0:
            return 0
        digest = hashlib.blake2b(digest_size=16)
        cached_chars = 0
        missed = False
        full = len(prompt) - len(prompt) % BLOCK_CHARS
        for start in range(0, full, BLOCK_CHARS):
            digest.update(prompt[start : start + BLOCK_CHARS].encode())
            key = digest.copy().digest()
            if not missed and key in self._blocks:
                self._blocks.move_to_end(key)
                cached_chars = start + BLOCK_CHARS
            else:
                missed = True
                self._blocks[key] = None
                if len(self._blocks) > self.capacity:
                    self._blocks.popitem(last=False)
        return count_tokens(prompt[:cached_chars])


class Scheduler:
    """Admission into a batch of at most `max_batch` sequences, FIFO beyond it.

    A request asks for as many slots as it has choices (`n`), capped at the batch
    size. `abort_waiting()` releases every queued request at once (used by /sleep).
    """

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.running = 0
        self._waiters: deque[tuple[int, asyncio.Future[bool]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def admit(self, slots: int) -> bool:
        """Wait for `slots` free slots; False when the wait was aborted."""
        slots = min(slots, self.max_batch)
        if not self._waiters and self.running + slots <= self.max_batch:
            self.running += slots
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (slots, future)
        self._waiters.append(entry)
        try:
            return await future
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif future.done() and not future.cancelled() and future.result():
                self.release(slots)
            raise

    def release(self, slots: int) -> None:
        """Give back the slots of a finished sequence group and admit who fits."""
        self.running -= min(slots, self.max_batch)
        while self._waiters:
            want, future = self._waiters[0]
            if self.running + want > self.max_batch:
                break
            self._waiters.popleft()
            if not future.done():
                self.running += want
                future.set_result(True)

    def abort_waiting(self) -> int:
        """Wake every queued request with False; returns how many there were."""
        count = 0
        while self._waiters:
            _, future = self._waiters.popleft()
            if not future.done():
                future.set_result(False)
                count += 1
        return count
