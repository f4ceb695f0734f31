"""A noise-free replay of the simulator's cost model: baselines for routing quality.

Why: a live "ideal" router is only a heuristic measured with noise. Replaying a
schedule through the very arithmetic of `lmfleet sim` (lmfleet/sim/engine.py and
generation.py) gives, with no noise at all,

- a hard per-request lower bound: each request alone on the fastest node, no
  queueing, with every prefix block any earlier request could have cached;
- an offline reference: the same schedule routed by rules that know every output
  length and every node's exact state, the best p99 over several rules.

What is replayed, exactly as the simulator does it (one node):

- admission: at most `max_batch` sequences hold a slot; one more waits in a FIFO
  queue and is admitted the moment a slot frees (no overtaking);
- on admission the prompt is looked up in the node's prefix cache (an LRU of
  64-character blocks, hash-chained) and its blocks are inserted;
- first token after `CostModel.prefill_seconds(prompt, cached)`;
- each of the remaining `output - 1` tokens after a sleep of
  `CostModel.step_seconds(running)`, where `running` (slots held, prefilling ones
  included) is read when that sleep starts;
- the slot is released right after the last token.

Not replayed: HTTP and event-loop overhead, and the client's routing time. The
live check (`python -m bench.routing_quality --check-replay`) measures that gap.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from bench.routing_workload import MixMeans, Schedule
from lmfleet.sim.engine import BLOCK_CHARS, CostModel

BLOCK_TOKENS = BLOCK_CHARS // 4  # count_tokens of one cached block

# -- nodes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeModel:
    """One node's cost-model flags (`lmfleet sim` defaults, but max batch 8)."""

    speed: float = 1.0
    max_batch: int = 8
    ttft_ms: float = 40.0
    prefill_ms_per_token: float = 0.1
    tpot_ms: float = 20.0
    batch_slowdown: float = 0.02
    cache_blocks: int = 4096
    sleep_overhead_ms: float = 0.0
    """Replay only (not a simulator flag): added to every sleep (prefill, each step) to
    model a live event loop's timer overshoot; it does not scale with `scaled()`."""

    def cost(self) -> CostModel:
        return CostModel.from_ms(
            ttft_ms=self.ttft_ms,
            prefill_ms_per_token=self.prefill_ms_per_token,
            tpot_ms=self.tpot_ms,
            batch_slowdown=self.batch_slowdown,
            speed=self.speed,
        )

    def scaled(self, k: float) -> NodeModel:
        """Every time divided by `k`: the same ratios, a `k` times shorter run."""
        return replace(
            self,
            ttft_ms=self.ttft_ms / k,
            prefill_ms_per_token=self.prefill_ms_per_token / k,
            tpot_ms=self.tpot_ms / k,
        )

    def coarsened(self, factor: int) -> NodeModel:
        """TPOT `factor` times longer, for outputs `factor` times shorter (coarse_mix)."""
        return replace(self, tpot_ms=self.tpot_ms * factor)

    def sim_args(self) -> list[str]:
        """`lmfleet sim` flags for this node (output length is set per request)."""
        return [
            "--speed", repr(self.speed),
            "--max-batch", str(self.max_batch),
            "--ttft-ms", repr(self.ttft_ms),
            "--prefill-ms-per-token", repr(self.prefill_ms_per_token),
            "--tpot-ms", repr(self.tpot_ms),
            "--batch-slowdown", repr(self.batch_slowdown),
            "--prefix-cache-blocks", str(self.cache_blocks),
        ]  # fmt: skip


def fleet(speeds: Sequence[float], **flags: float) -> tuple[NodeModel, ...]:
    return tuple(NodeModel(speed=s, **flags) for s in speeds)  # type: ignore[arg-type]


def capacity(nodes: Sequence[NodeModel], means: MixMeans) -> float:
    """Requests/s the nodes complete with every batch slot busy, no prefix cache hits.

    A full node holds `max_batch` sequences, each for its prefill plus
    `output - 1` steps at the full-batch step time; service time is linear in
    prompt and output tokens, so the mean request's time is the mean time.
    """
    total = 0.0
    for node in nodes:
        cost = node.cost()
        prefill = cost.ttft + cost.prefill_per_token * means.prompt_tokens
        service = prefill + (means.output_tokens - 1) * cost.step_seconds(node.max_batch)
        total += node.max_batch / service
    return total


# -- the prompts' cache blocks ---------------------------------------------------------


def block_keys(prompt: str) -> tuple[bytes, ...]:
    """The hash-chained keys of the full 64-character blocks, as `PrefixCache` makes them."""
    digest = hashlib.blake2b(digest_size=16)
    full = len(prompt) - len(prompt) % BLOCK_CHARS
    keys = []
    for start in range(0, full, BLOCK_CHARS):
        digest.update(prompt[start : start + BLOCK_CHARS].encode())
        keys.append(digest.copy().digest())
    return tuple(keys)


class BlockCache:
    """`engine.PrefixCache` on precomputed keys, plus a side-effect-free `peek`."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def lookup_and_insert(self, keys: Sequence[bytes]) -> int:
        """Cached blocks of a prompt; then remember all of its blocks (LRU)."""
        if self.capacity == 0:
            return 0
        cached = 0
        missed = False
        for key in keys:
            if not missed and key in self._blocks:
                self._blocks.move_to_end(key)
                cached += 1
            else:
                missed = True
                self._blocks[key] = None
                if len(self._blocks) > self.capacity:
                    self._blocks.popitem(last=False)
        return cached

    def peek(
        self, keys: Sequence[bytes], pending: set[bytes] | frozenset[bytes] = frozenset()
    ) -> int:
        """Blocks that would hit now, counting `pending` (blocks of requests queued ahead)."""
        if self.capacity == 0:
            return 0
        cached = 0
        for key in keys:
            if key not in self._blocks and key not in pending:
                break
            cached += 1
        return cached


@dataclass(frozen=True, slots=True)
class Prepared:
    """Per request: prompt tokens, cache keys, output tokens (computed once per schedule)."""

    prompt_tokens: tuple[int, ...]
    keys: tuple[tuple[bytes, ...], ...]
    output_tokens: tuple[int, ...]


def prepare(schedule: Schedule) -> Prepared:
    prompts = [r.sim_prompt() for r in schedule.requests]
    return Prepared(
        prompt_tokens=tuple((len(p) + 3) // 4 for p in prompts),
        keys=tuple(block_keys(p) for p in prompts),
        output_tokens=tuple(r.output_tokens for r in schedule.requests),
    )


# -- the discrete-event simulation -----------------------------------------------------


@dataclass(eq=False, slots=True)
class Seq:
    """One request on one node."""

    index: int
    node: int
    issued: float
    next_at: float = math.nan  # time of its next token (the first: end of prefill)
    step: float = 0.0  # length of the sleep that ends at next_at (0 while prefilling)
    steps_left: int = 0  # tokens still due after the one at next_at
    first: float = math.nan
    cached_tokens: int = 0


@dataclass(eq=False)
class NodeState:
    """One replayed node: slots held, FIFO queue, prefix cache."""

    model: NodeModel
    cost: CostModel
    cache: BlockCache
    active: list[Seq] = field(default_factory=list)
    queue: deque[Seq] = field(default_factory=deque)

    @property
    def running(self) -> int:
        return len(self.active)

    @property
    def load(self) -> int:
        return len(self.active) + len(self.queue)


@dataclass(frozen=True, slots=True)
class View:
    """What a routing rule sees: exact node states and the whole schedule's facts."""

    now: float
    nodes: list[NodeState]
    prepared: Prepared


Rule = Callable[[View, int], int]
"""(view, request index) -> node index."""


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """Per request of the schedule (NaN where never sent: closed loop past the stop)."""

    latency: tuple[float, ...]
    ttft: tuple[float, ...]
    node: tuple[int, ...]
    cached_tokens: tuple[int, ...]
    issued: tuple[float, ...]

    @property
    def makespan(self) -> float:
        """When the last request finished."""
        return max(
            (
                t + lat
                for t, lat in zip(self.issued, self.latency, strict=True)
                if not math.isnan(lat)
            ),
            default=0.0,
        )

    def done(self, clients: Sequence[int] | None, schedule: Schedule) -> list[int]:
        """Indices sent and finished, optionally only of some clients."""
        return [
            i
            for i, r in enumerate(schedule.requests)
            if not math.isnan(self.latency[i]) and (clients is None or r.client in clients)
        ]


class Replay:
    """Runs one schedule over `nodes` with one rule; `run()` returns the latencies."""

    def __init__(
        self, schedule: Schedule, prepared: Prepared, nodes: Sequence[NodeModel], rule: Rule
    ) -> None:
        self.schedule = schedule
        self.prepared = prepared
        self.rule = rule
        self.nodes = [NodeState(m, m.cost(), BlockCache(m.cache_blocks)) for m in nodes]
        self.events: list[tuple[float, int, int, Seq | int]] = []
        self.order = 0
        n = len(schedule.requests)
        self.latency = [math.nan] * n
        self.ttft = [math.nan] * n
        self.where = [-1] * n
        self.cached = [0] * n
        self.issued = [math.nan] * n
        self.now = 0.0

    # events: (time, order, kind, payload); kind 0 = a token is due, 1 = an arrival
    def _push(self, at: float, kind: int, payload: Seq | int) -> None:
        heapq.heappush(self.events, (at, self.order, kind, payload))
        self.order += 1

    def run(self) -> ReplayResult:
        closed = self.schedule.mode == "closed"
        if closed:
            self._start_closed()
        else:
            for r in self.schedule.requests:
                self._push(r.arrival, 1, r.index)
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == 1:
                self._issue(payload)  # type: ignore[arg-type]
            else:
                self._token(payload)  # type: ignore[arg-type]
        return ReplayResult(
            tuple(self.latency),
            tuple(self.ttft),
            tuple(self.where),
            tuple(self.cached),
            tuple(self.issued),
        )

    def _issue(self, index: int) -> None:
        node_index = self.rule(View(self.now, self.nodes, self.prepared), index)
        seq = Seq(index, node_index, self.now)
        self.where[index] = node_index
        self.issued[index] = self.now
        node = self.nodes[node_index]
        if not node.queue and node.running < node.model.max_batch:
            self._admit(node, seq)
        else:
            node.queue.append(seq)

    def _admit(self, node: NodeState, seq: Seq) -> None:
        node.active.append(seq)
        blocks = node.cache.lookup_and_insert(self.prepared.keys[seq.index])
        seq.cached_tokens = blocks * BLOCK_TOKENS
        prefill = node.cost.prefill_seconds(
            self.prepared.prompt_tokens[seq.index], seq.cached_tokens
        )
        seq.next_at = self.now + prefill + node.model.sleep_overhead_ms / 1000
        seq.step = 0.0
        seq.steps_left = self.prepared.output_tokens[seq.index] - 1
        self._push(seq.next_at, 0, seq)

    def _token(self, seq: Seq) -> None:
        node = self.nodes[seq.node]
        if math.isnan(seq.first):
            seq.first = self.now
        if seq.steps_left > 0:
            seq.step = node.cost.step_seconds(node.running) + node.model.sleep_overhead_ms / 1000
            seq.steps_left -= 1
            seq.next_at = self.now + seq.step
            self._push(seq.next_at, 0, seq)
            return
        node.active.remove(seq)
        self.latency[seq.index] = self.now - seq.issued
        self.ttft[seq.index] = seq.first - seq.issued
        self.cached[seq.index] = seq.cached_tokens
        while node.queue and node.running < node.model.max_batch:
            self._admit(node, node.queue.popleft())
        self._finished(seq)

    # -- closed loop ---------------------------------------------------------------

    def _start_closed(self) -> None:
        """Every client sends its first `concurrency` requests at time 0, interleaved."""
        self.pending = [deque(self.schedule.for_client(c)) for c in range(self.schedule.clients)]
        self.outstanding = [0] * self.schedule.clients
        self.stopped = False
        conc = self.schedule.concurrency
        for slot in range(max(conc)):
            for client in range(self.schedule.clients):
                if slot < conc[client]:
                    self._next_of(client)

    def _next_of(self, client: int) -> None:
        if self.stopped or not self.pending[client]:
            return
        self.outstanding[client] += 1
        self._issue(self.pending[client].popleft().index)

    def _finished(self, seq: Seq) -> None:
        if self.schedule.mode != "closed":
            return
        client = self.schedule.requests[seq.index].client
        self.outstanding[client] -= 1
        self._next_of(client)
        if not self.pending[0] and self.outstanding[0] == 0:
            self.stopped = True  # the primary client is done: nobody sends more


def replay(
    schedule: Schedule, nodes: Sequence[NodeModel], rule: Rule, prepared: Prepared | None = None
) -> ReplayResult:
    return Replay(schedule, prepared or prepare(schedule), nodes, rule).run()


# -- the reference rules ---------------------------------------------------------------


def _by_score(view: View, score: Callable[[int, NodeState], float]) -> int:
    """The node with the lowest score; ties go to the faster node, then the lower index."""
    return min(
        range(len(view.nodes)),
        key=lambda i: (score(i, view.nodes[i]), -view.nodes[i].model.speed, i),
    )


def jsq_count(view: View, index: int) -> int:
    """Join the shortest queue: fewest requests on the node (running + waiting)."""
    return _by_score(view, lambda _, node: node.load)


def jsq_speed(view: View, index: int) -> int:
    """(requests on the node + 1) / speed: the previous bench's "ideal", now exact."""
    return _by_score(view, lambda _, node: (node.load + 1) / node.model.speed)


def _service(node: NodeState, prepared: Prepared, index: int, batch: int) -> float:
    """Seconds one request holds a slot at a steady `batch` (prefill without cache)."""
    cost = node.cost
    steps = prepared.output_tokens[index] - 1
    return cost.prefill_seconds(prepared.prompt_tokens[index]) + steps * cost.step_seconds(batch)


def least_work(view: View, index: int) -> int:
    """JSQ by remaining work in seconds, with known output lengths.

    Wait = the work ahead (remaining time of the running sequences plus the service
    time of the queued ones, at the full-batch step time) spread over the slots,
    if no slot is free; plus the request's own service time on that node.
    """
    prepared = view.prepared

    def score(_: int, node: NodeState) -> float:
        full = node.model.max_batch
        own = _service(node, prepared, index, min(full, node.running + 1))
        if node.running < full and not node.queue:
            return own
        step = node.cost.step_seconds(full)
        ahead = sum(max(0.0, s.next_at - view.now) + s.steps_left * step for s in node.active)
        ahead += sum(_service(node, prepared, q.index, full) for q in node.queue)
        return ahead / full + own

    return _by_score(view, score)


def least_finish(view: View, index: int) -> int:
    """The node where the request would finish first, given everything now on each node.

    A fluid forecast per node (every running sequence advances at the step time of
    the current batch, queued ones are admitted in order, cache hits from what is
    cached or queued ahead), with no later arrivals: greedy earliest completion.
    """
    return _by_score(view, lambda _, node: forecast_finish(node, view.now, view.prepared, index))


def forecast_finish(node: NodeState, now: float, prepared: Prepared, index: int) -> float:
    """When request `index` would finish on `node` if sent now (fluid approximation)."""
    cost = node.cost
    # each entry: [prefill seconds left, decode steps left, is the new request]
    active: list[list[float]] = []
    for s in node.active:
        left = s.next_at - now
        if s.step == 0.0:  # still prefilling: its first token is at next_at
            active.append([max(0.0, left), float(s.steps_left), 0.0])
        else:
            active.append([0.0, s.steps_left + max(0.0, left) / s.step, 0.0])
    pending: set[bytes] = set()
    waiting: deque[list[float]] = deque()
    for q in [*node.queue, None]:
        i = index if q is None else q.index
        keys = prepared.keys[i]
        hit = node.cache.peek(keys, pending) * BLOCK_TOKENS
        pending.update(keys)
        prefill = cost.prefill_seconds(prepared.prompt_tokens[i], hit)
        waiting.append([prefill, float(prepared.output_tokens[i] - 1), float(q is None)])
    t = now
    full = node.model.max_batch
    while True:
        while waiting and len(active) < full:
            active.append(waiting.popleft())
        step = cost.step_seconds(len(active))
        dt = min(e[0] + e[1] * step for e in active)
        t += dt
        survivors = []
        for e in active:
            if e[0] + e[1] * step <= dt + 1e-12:
                if e[2]:
                    return t
                continue
            if e[0] >= dt:
                e[0] -= dt
            else:
                e[1] -= (dt - e[0]) / step
                e[0] = 0.0
            survivors.append(e)
        active = survivors


RULES: dict[str, Rule] = {
    "jsq_count": jsq_count,
    "jsq_speed": jsq_speed,
    "least_work": least_work,
    "least_finish": least_finish,
}
"""The reference's candidates; the reference is the best p99 among them, per seed."""


# -- the lower bound ---------------------------------------------------------------------


def lower_bound(
    schedule: Schedule, nodes: Sequence[NodeModel], prepared: Prepared | None = None
) -> tuple[list[float], list[float]]:
    """(latency, TTFT) per request: alone on the best node, no queueing, best cache.

    Best cache: every block that any earlier request (in schedule order) carried is
    assumed cached. A node can only hit blocks of requests admitted before, which,
    with FIFO admission, arrived before; so no routing can do better. Then
    p-th percentile of any router >= p-th percentile of these (order statistics).
    """
    prepared = prepared or prepare(schedule)
    costs = [n.cost() for n in nodes]
    seen: set[bytes] = set()
    latency, ttft = [], []
    for i in range(len(schedule.requests)):
        keys = prepared.keys[i]
        hit = 0
        for key in keys:
            if key not in seen:
                break
            hit += 1
        seen.update(keys)
        steps = prepared.output_tokens[i] - 1
        first = min(c.prefill_seconds(prepared.prompt_tokens[i], hit * BLOCK_TOKENS) for c in costs)
        whole = min(
            c.prefill_seconds(prepared.prompt_tokens[i], hit * BLOCK_TOKENS)
            + steps * c.step_seconds(1)
            for c in costs
        )
        ttft.append(first)
        latency.append(whole)
    return latency, ttft
