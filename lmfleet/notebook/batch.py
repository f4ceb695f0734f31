"""Batch helpers: thousands of prompts across the fleet, in input order, with progress.

`run_batch` is the one implementation: a fixed pool of `concurrency` workers pulls
items in order through the routed `AsyncOpenAI`; an item that fails is retried
(bounded, with jittered backoff) and, if it still fails, recorded as an `ItemError`
in its slot. Nothing is raised mid-batch and nothing is lost:
`len(result) == len(inputs)`.

Retries do not stack: the batch's client has openai's `max_retries=0` (the
router already failed over between nodes), and an item is not retried after
errors that already spent their wait: `NoHealthyNodeError` (the router waited
`wait_for_node`) and the caller's own timeout (docs/guide/failover.md).

`run_requests` is the one body of `chat_many` and `complete_many` (an `Endpoint`
each). The sync methods (`LMFleet.chat_many`, ...) run the same coroutine in the
fleet's background loop (lmfleet/sync.py), so they work in a Jupyter cell whose own
loop is already running (no `asyncio.run` inside a running loop).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, cast

import anyio
import openai
import tenacity
from openai.types import Completion, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from lmfleet.errors import ConfigError, NoHealthyNodeError, install_hint
from lmfleet.jobs.adaptive import START_PER_NODE, AdaptiveConcurrency, Signals
from lmfleet.jobs.journal import Journal, JournalMode, item_key
from lmfleet.jobs.results import LOADERS, Answered, BatchResult, ItemError, Segments
from lmfleet.priority import PRIORITY_HEADER
from lmfleet.transport.continuation import VERSIONS_HEADER, parse_versions
from lmfleet.transport.plan import SERVED_VERSION_HEADER
from lmfleet.transport.router import MAX_STALENESS_HEADER, WEIGHT_VERSION_HEADER

if TYPE_CHECKING:
    from lmfleet.surface import FleetSurface

log = logging.getLogger("lmfleet")

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - the input type

DEFAULT_RETRIES = 2
DEFAULT_MAX_CONCURRENCY = 512
"""`concurrency="auto"`'s default bound."""
BACKOFF = 0.2
"""Seconds before an item's first retry; doubled for each further one."""

RETRY_STATUS = frozenset({408, 409, 429})
"""Client-error statuses worth trying again (every 5xx is too)."""
REFUSALS = frozenset({429, 503})
"""Answers that say a node (or the fleet) is full: `concurrency="auto"` backs off."""
STEER_EVERY = 0.1
"""Seconds between two looks at the fleet's signals (`concurrency="auto"`; each
decision still waits for a new `/metrics` report)."""
FleetSignals = tuple[tuple[tuple[float, float], ...], float, bool]
"""`((waiting, running) per node, report time, every node reported)`: what
`fleet_signals` reads."""


def retryable(exc: BaseException) -> bool:
    """Worth another try after a pause: nodes failing or cut off, overload, server errors.

    Not: bad requests, and errors that already waited their full time (no healthy
    node within `wait_for_node`, the caller's own timeout): a retry would multiply it.
    """
    if isinstance(exc, (NoHealthyNodeError, openai.APITimeoutError)):
        return False
    if isinstance(exc, openai.APIConnectionError):  # node failures, cut answers
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500 or exc.status_code in RETRY_STATUS
    return False


NO_TQDM_HINT = f"the lmfleet batch progress bar needs tqdm: {install_hint('notebook')}"
"""Logged once per process when a batch asks for a bar that cannot be drawn."""


@functools.cache
def _hint_no_tqdm() -> None:
    """Say once why there is no bar: a bar that silently never appears looks like a
    hang, and a line per batch would be noise (`cache`: runs once per process)."""
    log.warning(NO_TQDM_HINT)


class _Progress:
    """A tqdm bar (a widget in notebooks, text in terminals) or nothing."""

    def __init__(self, total: int, desc: str, enabled: bool, resumed: int = 0) -> None:
        self._bar: Any = None
        self._resumed = resumed
        self.concurrency: int | None = None
        """The current in-flight limit, shown when it moves (`concurrency="auto"`)."""
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # the `notebook` extra is not installed: no bar
                _hint_no_tqdm()
                return
            # `initial`: the items a journal answered count as done, and the ETA is
            # from the rate of this run's items only (tqdm's own rate and remaining).
            self._bar = tqdm(total=total, initial=resumed, desc=desc, unit="req", smoothing=0.1)

    def update(self, failed: int, tokens: int, started: float) -> None:
        if self._bar is None:
            return
        elapsed = time.monotonic() - started
        rate = tokens / elapsed if elapsed > 0 else 0.0
        shown: dict[str, Any] = {"failed": failed, "tok_s": f"{rate:,.0f}"}
        if self._resumed:
            shown["resumed"] = self._resumed
        if self.concurrency is not None:
            shown["in_flight"] = self.concurrency
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_batch(
    inputs: Sequence[I],
    call: Callable[[I], Awaitable[Answered[T]]],
    *,
    concurrency: int | AdaptiveConcurrency = 64,
    retries: int = DEFAULT_RETRIES,
    progress: bool = True,
    desc: str = "lmfleet",
    backoff: float = BACKOFF,
    done: Mapping[int, Answered[T]] | None = None,
    finished: Callable[[int, Answered[T] | ItemError], None] | None = None,
    signals: Callable[[], FleetSignals] | None = None,
) -> BatchResult[T]:
    """Run `call(item) -> Answered` over `inputs`; see the module docstring. `done`:
    items already answered (a journal's), not asked again; `finished(index, outcome)`
    is called as each other item ends (the journal records it). An
    `AdaptiveConcurrency` moves the in-flight limit with what `signals()` says of the
    fleet (jobs/adaptive.py), read every `STEER_EVERY` seconds."""
    if isinstance(concurrency, AdaptiveConcurrency):
        adaptive: AdaptiveConcurrency | None = concurrency
        if signals is None:
            raise ConfigError("an adaptive concurrency needs the fleet's signals")
        workers, first = concurrency.maximum, concurrency.limit
    else:
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        adaptive, workers, first = None, concurrency, concurrency
    if retries < 0:
        raise ConfigError(f"retries must be >= 0, got {retries}")
    done = done or {}
    results: list[T | ItemError | None] = [None] * len(inputs)
    versions: list[Segments | None] = [None] * len(inputs)
    for index, answer in done.items():
        results[index], versions[index] = answer.value, answer.versions
    pending = ((i, item) for i, item in enumerate(inputs) if i not in done)
    started = time.monotonic()
    counts = {"failed": 0, "tokens": 0, "refused": 0}
    bar = _Progress(len(inputs), desc, progress, resumed=len(done))
    limit = anyio.CapacityLimiter(first)

    policy = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(retries + 1),
        wait=tenacity.wait_exponential_jitter(multiplier=backoff, jitter=backoff),
        retry=tenacity.retry_if_exception(retryable),
        reraise=True,
        sleep=anyio.sleep,
    )

    async def attempt(index: int, item: I) -> Answered[T] | ItemError:
        tries = 0

        async def once() -> Answered[T]:
            nonlocal tries
            tries += 1
            try:
                return await call(item)
            except openai.APIStatusError as exc:
                if exc.status_code in REFUSALS:  # a node saying it is full: less in flight
                    counts["refused"] += 1
                raise

        try:
            # A copy per item: a tenacity controller keeps its iteration state per
            # thread, and every item's coroutine runs on this one thread.
            answer: Answered[T] = await policy.copy()(once)
        except Exception as exc:  # noqa: BLE001 - recorded per item, never raised mid-batch
            return ItemError(index=index, error=exc, attempts=tries)
        return dataclasses.replace(answer, attempts=tries)

    async def worker() -> None:
        while True:
            async with limit:
                taken = next(pending, None)
                if taken is None:
                    return
                index, item = taken
                outcome = await attempt(index, item)
            if isinstance(outcome, ItemError):
                counts["failed"] += 1
                results[index] = outcome
            else:
                counts["tokens"] += outcome.tokens
                results[index], versions[index] = outcome.value, outcome.versions
            if finished is not None:
                finished(index, outcome)
            bar.update(counts["failed"], counts["tokens"], started)

    async def steer(controller: AdaptiveConcurrency, read: Callable[[], FleetSignals]) -> None:
        seen = 0  # refusals already told to the controller
        decided = -math.inf  # the report of its last decision
        while True:
            await anyio.sleep(STEER_EVERY)
            nodes, report, complete = read()
            told = Signals(nodes, counts["refused"] - seen, report, complete)
            before = controller.limit
            limit.total_tokens = controller.observe(told, limit.borrowed_tokens)
            if report > decided:  # decided on: those refusals are told (else they wait)
                decided, seen = report, counts["refused"]
            if controller.limit != before:
                bar.concurrency = controller.limit

    try:
        async with anyio.create_task_group() as outer:
            if adaptive is not None and signals is not None:
                bar.concurrency = adaptive.limit
                outer.start_soon(steer, adaptive, signals)
            async with anyio.create_task_group() as tg:
                for _ in range(min(workers, max(len(inputs), 1))):
                    tg.start_soon(worker)
            outer.cancel_scope.cancel()  # the workers are done: so is the steering
    finally:
        bar.close()
    ready: list[T | ItemError] = []
    for item in results:
        assert item is not None
        ready.append(item)
    elapsed = time.monotonic() - started
    return BatchResult(
        ready, elapsed=elapsed, tokens=counts["tokens"], versions=versions, resumed=len(done)
    )


# -- chat and completions over a fleet ----------------------------------------------------


def _check_params(params: dict[str, Any]) -> None:
    if params.get("stream"):
        raise ConfigError(
            "chat_many and complete_many collect whole responses, so stream=True is not "
            "supported: leave stream out, or stream each request yourself with "
            "fleet.async_client().chat.completions.create(..., stream=True)"
        )


VersionAsk = int | Literal["current"] | None
"""A batch's weight version: a number, "current" (the newest version a healthy node
serves when the batch starts), or None (any node the fleet routes to)."""


def pin_version(fleet: FleetSurface, ask: VersionAsk, params: dict[str, Any]) -> int | None:
    """Add the version header to `params` so that every request of the batch is served
    by nodes of one weight version: a batch of RL rollouts must not mix policies. A
    request that finds no such node waits `wait_for_node`, then fails as an item."""
    if ask is None:
        return None
    if ask == "current":
        versions = [n.weight_version for n in fleet.registry.snapshot() if n.routable]
        if not versions:
            raise ConfigError('weight_version="current": no node is healthy to take it from')
        ask = max(versions)
    if isinstance(ask, bool) or not isinstance(ask, int):
        raise ConfigError(f'weight_version must be an integer or "current", got {ask!r}')
    headers = dict(params.get("extra_headers") or {})
    headers[WEIGHT_VERSION_HEADER] = str(ask)
    params["extra_headers"] = headers
    return ask


def bound_staleness(k: int | None, params: dict[str, Any]) -> None:
    """Add the staleness header to `params`: every request of the batch is served by a
    node within `k` weight versions of the newest in the fleet when it is sent (a
    rolling update keeps the batch flowing; a trainer bounds how off-policy it is)."""
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"max_staleness must be a number of versions, 0 or more, got {k!r}")
    params["extra_headers"] = {**(params.get("extra_headers") or {}), MAX_STALENESS_HEADER: str(k)}


def ask_priority(priority: int | None, params: dict[str, Any]) -> None:
    """Add the priority header to `params`: every request of the batch waits behind
    higher priorities, and a negative one waits in the fleet for room in a full node."""
    if priority is None:
        return
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ConfigError(f"priority must be an integer (higher goes first), got {priority!r}")
    params["extra_headers"] = {
        **(params.get("extra_headers") or {}),
        PRIORITY_HEADER: str(priority),
    }


def _node_of(url: Any) -> str:
    """The node URL (`http://host:port`) a routed response came from."""
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme}://{url.host}{port}"


@dataclass(frozen=True)
class BatchOptions:
    """The options every batch method takes, as `LMFleet.achat_many` documents them."""

    model: str | None
    concurrency: int | Literal["auto"]
    retries: int
    progress: bool
    weight_version: VersionAsk
    params: dict[str, Any]
    """Passed on to the endpoint's `create` (`max_tokens=...`)."""
    max_staleness: int | None = None
    journal: str | os.PathLike[str] | None = None
    journal_mode: JournalMode = "resume"
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    """The bound of `concurrency="auto"`."""
    priority: int | None = None
    """Every request's priority (lmfleet/priority.py); None: the default."""


class _Answer(Protocol):
    @property
    def usage(self) -> CompletionUsage | None: ...


R = TypeVar("R", bound=_Answer)


@dataclass(frozen=True)
class Endpoint(Generic[I, R]):
    """An OpenAI endpoint a batch sends its items to."""

    name: str
    """The progress bar's label, and the route a journal records."""
    items: Callable[[Sequence[Any]], list[I]]
    """The batch's inputs as this endpoint sends them, checked before any request: a
    mistake the caller made once is one `ConfigError`, not an `ItemError` per item."""
    send: Callable[[openai.AsyncOpenAI, str, I, dict[str, Any]], Awaitable[tuple[R, Any]]]
    """`(client, model, item, params) -> (response, the raw HTTP answer it came in)`."""


async def _send_chat(
    client: openai.AsyncOpenAI,
    model: str,
    messages: Sequence[ChatCompletionMessageParam],
    params: dict[str, Any],
) -> tuple[ChatCompletion, Any]:
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=list(messages), **params
    )
    return raw.parse(), raw.http_response


async def _send_completion(
    client: openai.AsyncOpenAI, model: str, prompt: str, params: dict[str, Any]
) -> tuple[Completion, Any]:
    raw = await client.completions.with_raw_response.create(model=model, prompt=prompt, **params)
    return raw.parse(), raw.http_response


def _not_one(inputs: Sequence[Any], method: str, what: str) -> None:
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
        raise ConfigError(
            f"{method} takes a list of {what}, got {type(inputs).__name__}: "
            f"for one, give a list of one"
        )


def _conversations(inputs: Sequence[Any]) -> list[Sequence[ChatCompletionMessageParam]]:
    """Each item a conversation (a list of messages) or a string, which is the user's
    one message: the README's `chat_many(prompts)`, which `list()` would otherwise
    have split into one-letter messages for every node to refuse."""
    _not_one(inputs, "chat_many", "conversations (each a list of messages) or of strings")
    conversations: list[Sequence[ChatCompletionMessageParam]] = []
    for index, item in enumerate(inputs):
        if isinstance(item, str):
            conversations.append([{"role": "user", "content": item}])
            continue
        if isinstance(item, Mapping):
            problem = "one message, not a conversation: wrap it in a list"
        elif isinstance(item, Sequence) and not isinstance(item, bytes):
            if all(isinstance(message, Mapping) for message in item):
                conversations.append(item)
                continue
            problem = "a list whose messages are not all dicts"
        else:
            problem = f"a {type(item).__name__}"
        raise ConfigError(
            f"chat_many: item {index} is {problem}; each item is a list of messages "
            f'([{{"role": "user", "content": ...}}]) or a string (the user\'s message)'
        )
    return conversations


def _prompts(inputs: Sequence[Any]) -> list[str]:
    """Each item a prompt as `/v1/completions` takes it (a string, or token ids)."""
    _not_one(inputs, "complete_many", "prompts")
    for index, item in enumerate(inputs):
        if isinstance(item, str):
            continue
        if isinstance(item, Sequence) and all(isinstance(token, int) for token in item):
            continue
        talk = isinstance(item, Mapping) or (
            isinstance(item, Sequence) and any(isinstance(part, Mapping) for part in item)
        )
        hint = " (messages: use chat_many)" if talk else ""
        raise ConfigError(
            f"complete_many: item {index} is a {type(item).__name__}{hint}; each item is "
            "a prompt string (or a list of token ids)"
        )
    return list(inputs)


CHAT: Endpoint[Sequence[ChatCompletionMessageParam], ChatCompletion] = Endpoint(
    "chat", _conversations, _send_chat
)
COMPLETIONS: Endpoint[str, Completion] = Endpoint("complete", _prompts, _send_completion)
"""Their names are the routes a journal records (a recorded answer is read back by
`jobs/results.LOADERS[name]`, with or without a fleet)."""


async def run_requests(
    fleet: FleetSurface, endpoint: Endpoint[I, R], given: Sequence[Any], options: BatchOptions
) -> BatchResult[R]:
    """Send every item of `given` to `endpoint` through the fleet, as `run_batch` does:
    the one body of `chat_many`, `complete_many` and their async twins."""
    _check_params(options.params)
    inputs = endpoint.items(given)
    params = dict(options.params)
    pin_version(fleet, options.weight_version, params)
    bound_staleness(options.max_staleness, params)
    ask_priority(options.priority, params)
    chosen = options.model or fleet.model
    client = fleet.async_client(max_retries=0)  # the batch owns item retries

    async def call(item: I) -> Answered[R]:
        response, http = await endpoint.send(client, chosen, item, params)
        tokens = _count_tokens(fleet, http.url, response.usage)
        return Answered(response, tokens, answer_versions(http.headers, tokens))

    journal = None
    done: dict[int, Answered[R]] = {}
    finished = None
    if options.journal is not None:
        journal, done, finished = _journaled(endpoint, chosen, inputs, options)
    try:
        async with client:
            return await run_batch(
                inputs,
                call,
                concurrency=_concurrency(fleet, options),
                signals=fleet_signals(fleet, chosen),
                retries=options.retries,
                progress=options.progress,
                desc=endpoint.name,
                done=done,
                finished=finished,
            )
    finally:
        if journal is not None:
            journal.close()


def _concurrency(fleet: FleetSurface, options: BatchOptions) -> int | AdaptiveConcurrency:
    if options.concurrency == "auto":
        if options.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {options.max_concurrency}")
        nodes = sum(1 for n in fleet.registry.snapshot() if n.routable)
        return AdaptiveConcurrency(options.max_concurrency, START_PER_NODE * max(nodes, 1))
    if isinstance(options.concurrency, bool) or not isinstance(options.concurrency, int):
        raise ConfigError(f'concurrency must be a number or "auto", got {options.concurrency!r}')
    return options.concurrency


def fleet_signals(fleet: FleetSurface, model: str | None) -> Callable[[], FleetSignals]:
    """What `concurrency="auto"` steers by: the nodes that can serve `model` now, the
    requests waiting in their queues and when the newest of their `/metrics` reports
    came. Nodes that export no metrics give nothing to steer by but refusals: the
    limit then grows once a second until the maximum or a refusal."""

    def read() -> FleetSignals:
        nodes = [
            n
            for n in fleet.registry.snapshot()
            if n.routable and (model is None or not n.models or model in n.models)
        ]
        loads = [n.load for n in nodes if n.load is not None]
        if not loads:
            return (), float(math.floor(time.monotonic())), False
        each = tuple((load.waiting + (load.api_waiting or 0.0), load.running) for load in loads)
        return each, max(load.read_at for load in loads), len(loads) == len(nodes)

    return read


JOURNAL_IGNORES = frozenset({"extra_headers", "timeout"})
"""Parameters that do not change what an item asks (the version pins are headers)."""


def _journaled(
    endpoint: Endpoint[I, R], model: str, inputs: Sequence[I], options: BatchOptions
) -> tuple[Journal, dict[int, Answered[R]], Callable[[int, Answered[R] | ItemError], None]]:
    """The batch's journal, the items it already answered, and what records the rest."""
    asked = {k: v for k, v in options.params.items() if k not in JOURNAL_IGNORES}
    keys = [item_key(endpoint.name, model, item, asked) for item in inputs]
    assert options.journal is not None
    journal = Journal(options.journal, create=True)
    try:
        recorded = journal.begin(endpoint.name, keys, options.journal_mode)
        load = LOADERS[endpoint.name]
        done = {
            i: Answered(load(e.answer), e.tokens, e.versions, e.attempts)
            for i, e in recorded.items()
        }
    except BaseException:
        journal.close()
        raise

    def finished(index: int, outcome: Answered[R] | ItemError) -> None:
        if isinstance(outcome, ItemError):
            journal.record_error(index, keys[index], repr(outcome.error), outcome.attempts)
            return
        answer = cast("Any", outcome.value).model_dump(mode="json")
        journal.record(
            index, keys[index], answer, outcome.tokens, outcome.versions, outcome.attempts
        )

    return journal, done, finished


def answer_versions(headers: Any, tokens: int) -> Segments | None:
    """The version segments of a routed answer: its own list where one was continued
    across versions (`x-lmfleet-weight-versions`), else all its tokens from the
    version of the node that served it."""
    listed = headers.get(VERSIONS_HEADER)
    if listed is not None:
        return parse_versions(listed)
    served = headers.get(SERVED_VERSION_HEADER)
    if served is None or not served.lstrip("-").isdigit():
        return None
    return [[0, tokens, int(served)]] if tokens else []


def _count_tokens(fleet: FleetSurface, url: Any, usage: CompletionUsage | None) -> int:
    """The generated tokens of one answer, credited to the node that served it."""
    tokens = usage.completion_tokens if usage else 0
    if tokens:
        fleet.registry.add_tokens(_node_of(url), tokens)
    return tokens
