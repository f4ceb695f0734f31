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

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, overload

import anyio
import openai
import tenacity
from openai.types import Completion, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from lmfleet.errors import BatchError, ConfigError, NoHealthyNodeError, install_hint
from lmfleet.transport.continuation import VERSIONS_HEADER, parse_versions
from lmfleet.transport.plan import SERVED_VERSION_HEADER
from lmfleet.transport.router import MAX_STALENESS_HEADER, WEIGHT_VERSION_HEADER

if TYPE_CHECKING:
    from lmfleet.surface import FleetSurface

log = logging.getLogger("lmfleet")

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - the input type

DEFAULT_RETRIES = 2
BACKOFF = 0.2
"""Seconds before an item's first retry; doubled for each further one."""

RETRY_STATUS = frozenset({408, 409, 429})
"""Client-error statuses worth trying again (every 5xx is too)."""


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


@dataclass(frozen=True)
class ItemError:
    """An item that failed every attempt; sits in the result at the item's index."""

    index: int
    error: BaseException
    attempts: int

    def __str__(self) -> str:
        return f"item {self.index} failed after {self.attempts} attempt(s): {self.error!r}"


Segments = list[list[int]]
"""Which weight version made which output tokens: `[[start, end, version], ...]`."""


@dataclass(frozen=True)
class Answered(Generic[T]):
    """One item's answer, as a batch's `call` returns it."""

    value: T
    tokens: int
    """Generated tokens (the answer's `usage.completion_tokens`)."""
    versions: Segments | None = None


class BatchResult(Sequence["T | ItemError"], Generic[T]):
    """The results of a batch in input order: a response, or an `ItemError`, per item."""

    def __init__(
        self,
        items: list[T | ItemError],
        *,
        elapsed: float,
        tokens: int,
        versions: list[Segments | None] | None = None,
    ) -> None:
        self._items = items
        self.elapsed = elapsed
        """Seconds the whole batch took."""
        self.tokens = tokens
        """Generated tokens (sum of `usage.completion_tokens`)."""
        self.weight_versions = versions or [None] * len(items)
        """Per item, the weight versions its output tokens came from
        (`[[start, end, version], ...]`, as `/generate`'s `meta_info.weight_versions`):
        an RL trainer masks or corrects off-policy tokens from it. None where the item
        failed or its answer did not say."""

    @overload
    def __getitem__(self, index: int) -> T | ItemError: ...

    @overload
    def __getitem__(self, index: slice) -> list[T | ItemError]: ...

    def __getitem__(self, index: int | slice) -> T | ItemError | list[T | ItemError]:
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T | ItemError]:
        return iter(self._items)

    @property
    def ok(self) -> list[T]:
        """The successful responses (input order, failed items left out)."""
        return [item for item in self._items if not isinstance(item, ItemError)]

    @property
    def errors(self) -> list[ItemError]:
        return [item for item in self._items if isinstance(item, ItemError)]

    @property
    def texts(self) -> list[str | None]:
        """Each item's generated text (first choice); None where the item failed."""
        return [None if isinstance(item, ItemError) else _text(item) for item in self._items]

    def summary(self) -> str:
        rate = self.tokens / self.elapsed if self.elapsed > 0 else 0.0
        text = (
            f"{len(self._items) - len(self.errors)}/{len(self._items)} ok, "
            f"{len(self.errors)} failed in {self.elapsed:.1f} s ({rate:,.0f} tokens/s)"
        )
        errors = self.errors
        if errors:
            shown = "\n".join(f"  {e}" for e in errors[:5])
            more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
            text += f"\n{shown}{more}"
        return text

    def raise_for_errors(self) -> None:
        """Raise the first item's error (chained from it) when any item failed."""
        errors = self.errors
        if errors:
            raise BatchError(self.summary()) from errors[0].error

    def __repr__(self) -> str:
        return f"<BatchResult {self.summary().splitlines()[0]}>"


def _text(item: object) -> str | None:
    choices = getattr(item, "choices", None)
    if not choices:
        return None
    first = choices[0]
    message = getattr(first, "message", None)
    if message is not None:
        content: str | None = getattr(message, "content", None)
        return content
    text: str | None = getattr(first, "text", None)
    return text


NO_TQDM_HINT = f"the lmfleet batch progress bar needs tqdm: {install_hint('notebook')}"
"""Logged once per process when a batch asks for a bar that cannot be drawn."""


@functools.cache
def _hint_no_tqdm() -> None:
    """Say once why there is no bar: a bar that silently never appears looks like a
    hang, and a line per batch would be noise (`cache`: runs once per process)."""
    log.warning(NO_TQDM_HINT)


class _Progress:
    """A tqdm bar (a widget in notebooks, text in terminals) or nothing."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # the `notebook` extra is not installed: no bar
                _hint_no_tqdm()
                return
            self._bar = tqdm(total=total, desc=desc, unit="req", smoothing=0.1)

    def update(self, failed: int, tokens: int, started: float) -> None:
        if self._bar is None:
            return
        elapsed = time.monotonic() - started
        rate = tokens / elapsed if elapsed > 0 else 0.0
        self._bar.set_postfix(failed=failed, tok_s=f"{rate:,.0f}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_batch(
    inputs: Sequence[I],
    call: Callable[[I], Awaitable[Answered[T]]],
    *,
    concurrency: int = 64,
    retries: int = DEFAULT_RETRIES,
    progress: bool = True,
    desc: str = "lmfleet",
    backoff: float = BACKOFF,
) -> BatchResult[T]:
    """Run `call(item) -> Answered` over `inputs`; see the module docstring."""
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    if retries < 0:
        raise ConfigError(f"retries must be >= 0, got {retries}")
    results: list[T | ItemError | None] = [None] * len(inputs)
    versions: list[Segments | None] = [None] * len(inputs)
    pending = iter(enumerate(inputs))
    started = time.monotonic()
    counts = {"failed": 0, "tokens": 0}
    bar = _Progress(len(inputs), desc, progress)

    policy = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(retries + 1),
        wait=tenacity.wait_exponential_jitter(multiplier=backoff, jitter=backoff),
        retry=tenacity.retry_if_exception(retryable),
        reraise=True,
        sleep=anyio.sleep,
    )

    async def attempt(index: int, item: I) -> T | ItemError:
        tries = 0

        async def once() -> Answered[T]:
            nonlocal tries
            tries += 1
            return await call(item)

        try:
            # A copy per item: a tenacity controller keeps its iteration state per
            # thread, and every item's coroutine runs on this one thread.
            answer: Answered[T] = await policy.copy()(once)
        except Exception as exc:  # noqa: BLE001 - recorded per item, never raised mid-batch
            return ItemError(index=index, error=exc, attempts=tries)
        counts["tokens"] += answer.tokens
        versions[index] = answer.versions
        return answer.value

    async def worker() -> None:
        for index, item in pending:
            outcome = await attempt(index, item)
            if isinstance(outcome, ItemError):
                counts["failed"] += 1
            results[index] = outcome
            bar.update(counts["failed"], counts["tokens"], started)

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(min(concurrency, max(len(inputs), 1))):
                tg.start_soon(worker)
    finally:
        bar.close()
    done: list[T | ItemError] = []
    for item in results:
        assert item is not None
        done.append(item)
    elapsed = time.monotonic() - started
    return BatchResult(done, elapsed=elapsed, tokens=counts["tokens"], versions=versions)


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


def _node_of(url: Any) -> str:
    """The node URL (`http://host:port`) a routed response came from."""
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme}://{url.host}{port}"


@dataclass(frozen=True)
class BatchOptions:
    """The options every batch method takes, as `LMFleet.achat_many` documents them."""

    model: str | None
    concurrency: int
    retries: int
    progress: bool
    weight_version: VersionAsk
    params: dict[str, Any]
    """Passed on to the endpoint's `create` (`max_tokens=...`)."""
    max_staleness: int | None = None


class _Answer(Protocol):
    @property
    def usage(self) -> CompletionUsage | None: ...


R = TypeVar("R", bound=_Answer)


@dataclass(frozen=True)
class Endpoint(Generic[I, R]):
    """An OpenAI endpoint a batch sends its items to."""

    name: str
    """The progress bar's label."""
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


CHAT: Endpoint[Sequence[ChatCompletionMessageParam], ChatCompletion] = Endpoint("chat", _send_chat)
COMPLETIONS: Endpoint[str, Completion] = Endpoint("complete", _send_completion)


async def run_requests(
    fleet: FleetSurface, endpoint: Endpoint[I, R], inputs: Sequence[I], options: BatchOptions
) -> BatchResult[R]:
    """Send every item of `inputs` to `endpoint` through the fleet, as `run_batch` does:
    the one body of `chat_many`, `complete_many` and their async twins."""
    _check_params(options.params)
    params = dict(options.params)
    pin_version(fleet, options.weight_version, params)
    bound_staleness(options.max_staleness, params)
    chosen = options.model or fleet.model
    client = fleet.async_client(max_retries=0)  # the batch owns item retries

    async def call(item: I) -> Answered[R]:
        response, http = await endpoint.send(client, chosen, item, params)
        tokens = _count_tokens(fleet, http.url, response.usage)
        return Answered(response, tokens, answer_versions(http.headers, tokens))

    async with client:
        return await run_batch(
            inputs,
            call,
            concurrency=options.concurrency,
            retries=options.retries,
            progress=options.progress,
            desc=endpoint.name,
        )


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
