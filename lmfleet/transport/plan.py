"""One request's way through the fleet, as a generator of I/O steps (steps.py).

    lease a node (the strategy's pick; wait for one in the bounded admission queue,
    up to `wait_for_node` or the caller's own timeout, whichever ends first:
    `FleetBusyError` when the queue is full, `NoHealthyNodeError` at once when no
    node could ever take the request)
      -> send, waiting at most `first_byte_timeout` for the first response byte
      -> 2xx / 4xx: hand the answer back; its body holds the lease (streams.py)
      -> 5xx in `retry_status`, unreachable, dropped, no first byte in time:
         a node failure; another node, after a jittered backoff, while attempts last

Failover happens only while no response byte has reached the caller; a started
answer is never replayed. `Attempts` holds what a plain plan and a DistServe plan
share (leasing, judging a reply, backoff, the give-up errors), so both front
doors and both request kinds fail over by one set of rules.

One retry owner: when the attempts run out on a retryable status, the answer goes
back with `x-should-retry: false`, so openai (in the fleet's clients or in a
client of the proxy) does not try the same failing fleet again on top.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import httpx2

from lmfleet.answers import Answer, error_bytes
from lmfleet.config import RoutingOptions
from lmfleet.errors import FleetBusyError, NodeUnavailableError, NoHealthyNodeError
from lmfleet.node.client import NodeClient
from lmfleet.node.outliers import Outcome
from lmfleet.node.state import NodeRole, NodeState
from lmfleet.registry import NodeRegistry
from lmfleet.routing.base import RequestInfo, Strategy, as_base_strategy
from lmfleet.transport import tracing
from lmfleet.transport.renaming import rename_answer, renamed_request
from lmfleet.transport.request import REQUEST_ID
from lmfleet.transport.steps import Call, Discard, Pause, Steps, T
from lmfleet.transport.streams import Accounting, lease_response
from lmfleet.wire.headers import set_header

UNREACHED_ERRORS: tuple[type[Exception], ...] = (httpx2.ConnectError, httpx2.ConnectTimeout)
"""The node was never reached: it is down, so the circuit opens at once."""

DROPPED_ERRORS: tuple[type[Exception], ...] = (
    httpx2.RemoteProtocolError,
    httpx2.ReadError,
    httpx2.WriteError,
)
"""The node took the connection but dropped it before any response byte."""

PASSIVE_STATUS = frozenset({502, 503})
"""Answers that also open the circuit at once (a sleeping LMDeploy answers 503): the
monitor probes the node back, asking `/is_sleeping`."""

SERVED_VERSION_HEADER = "x-lmfleet-weight-version"
SERVED_VERSION_NAME = SERVED_VERSION_HEADER.encode()
"""On an answer: the weight version of the node that served it (transport/router.py
reads the same header on a request as an ask for that version)."""

POLL_INTERVAL = 0.05
"""How often a waiting request looks for a node again while one could take it (its
turn, room in a full node), and the first pause of any wait (seconds)."""

MAX_POLL_INTERVAL = 1.0
"""The longest pause between looks while no node could take the request (all asleep,
waking, down, updating their weights): the pause doubles up to it. Each look wakes
the caller's loop (a thousand requests waiting through a weight update cost half a
core at `POLL_INTERVAL`, bench/waiting_cost.py). A node that becomes healthy rings
the registry's doorbell (lmfleet/doorbell.py), which ends every pause at once; this
bounds the wait for what rings nothing (an ejection whose time is up is seen by the
next look, the monitor's or a request's)."""

STARVED_EVERY = 1.0
"""How often a waiting request tells the fleet again that it is starved (seconds): one
wake-up asked for may have been dropped (another node was being woken, the only
sleeper was still being put to sleep, or its wakeup failed)."""

TIMEOUT_HEADER = "x-lmfleet-timeout"
"""On a request: seconds the caller will wait in all (documented for any HTTP client);
a wait for a node never outlasts it."""

SDK_TIMEOUT_HEADER = "x-stainless-read-timeout"
"""The timeout openai's SDKs send with every request (their read timeout, seconds)."""

OWN_TIMEOUT = "lmfleet.own_timeout"
"""Request extension, true when the request's `timeout` extension is the front
door's own (the proxy's upstream timeout), not the caller's: only the caller's
headers then say how long it will wait."""

GIVE_UP = "lmfleet.give_up"
"""Request extension: a callable that returns why a waiting request should stop
waiting now (the proxy is stopping), or None; read on every poll of the wait."""

FIRST_ATTEMPT = "lmfleet.first_attempt"
"""Request extension: an attempt already made on a node before the plan started
(the proxy's fast lane, lmfleet/proxy/fast_lane.py): (the node, its lease, what it
answered: a response or the transport's error). The plan judges it by its own rules
first, as if it had made it, and fails over from there."""

REQUEST_SPAN = "lmfleet.request_span"
"""Request extension: the request's span, opened before the plan started (the fast
lane traced its attempt): the plan goes on with it rather than opening another."""

ANSWER_KIND = "lmfleet.answer"
"""Response extension of an answer decided without a node: its row's `kind`, for the
proxy's error counter."""

BUSY_RETRY_AFTER = 1.0
"""`FleetBusyError.retry_after` (seconds): a full queue empties as soon as a node
becomes eligible, which a sleeping or starting node does within seconds."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """The pause between failover attempts: exponential from `first`, plus up to
    `jitter` at random (so clients that failed together do not retry together),
    capped at `most`. One formula, called with the attempt number: the failover loop
    is a generator of steps, so tenacity's retry loop has no place to run it."""

    first: float
    most: float
    jitter: float
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    @classmethod
    def of(cls, options: RoutingOptions) -> Backoff:
        """`routing.backoff` doubling up to `routing.max_backoff`, jitter `routing.backoff`."""
        return cls(first=options.backoff, most=options.max_backoff, jitter=options.backoff)

    def __call__(self, attempt: int) -> float:
        pause = self.first * 2.0 ** (attempt - 1) + self.rng.uniform(0, self.jitter)
        return max(0.0, min(pause, self.most))


StarvedHook = Callable[[RequestInfo], None]


@dataclass(frozen=True, slots=True)
class Routing:
    """What every plan routes with: the fleet's nodes, strategy and options, the
    failover pauses, the node client that aims a request at its node (`nodes.aim`),
    and the hook that wakes a node for a starved request. The router holds one and
    hands it to each plan it starts (a value, so plans need no way back to the
    router)."""

    registry: NodeRegistry
    strategy: Strategy
    options: RoutingOptions
    nodes: NodeClient
    backoff: Backoff
    on_starved: StarvedHook | None = None
    tracer: Any = None
    """OpenTelemetry's tracer when tracing is on (transport/tracing.py), else None."""

    def starved(self, request: RequestInfo) -> None:
        """No node is eligible for `request`: the fleet may wake one that would be."""
        if self.on_starved is not None:
            self.on_starved(request)


class Retry(Exception):
    """This attempt failed before any byte reached the caller; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def attempt_read_timeout(read: float | None, first_byte: float | None) -> tuple[float | None, bool]:
    """The read timeout an attempt runs with: the caller's `read`, or `first_byte`
    when that is tighter; and whether the bound is ours (its expiry is then the node's
    failure, tried elsewhere, rather than the caller's timeout)."""
    if first_byte is None or (read is not None and read <= first_byte):
        return read, False
    return first_byte, True


def first_byte_bound(request: httpx2.Request, first_byte: float | None) -> bool:
    """Lower the request's read timeout to `first_byte`; True when that bound is ours.

    The read timeout bounds every wait for bytes from the node: the answer's head
    and, with `Call(first_byte=True)`, a stream's first body chunk. Later gaps in a
    stream get the same bound (a node silent that long mid-stream is as hung).
    """
    timeout = request.extensions.get("timeout") or {}
    bound, ours = attempt_read_timeout(timeout.get("read"), first_byte)
    if ours:
        request.extensions["timeout"] = {**timeout, "read": bound}
    return ours


def header_timeout(headers: httpx2.Headers) -> float | None:
    """The caller's timeout from its headers: lmfleet's own, else the openai SDK's.

    A malformed `x-lmfleet-timeout` never gets this far (the router answers it with
    `bad_timeout`); a malformed SDK header is not the caller's doing, so it is skipped.
    """
    for name in (TIMEOUT_HEADER, SDK_TIMEOUT_HEADER):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            return parse_timeout(raw)
        except ValueError:
            continue
    return None


def parse_timeout(raw: str | bytes) -> float:
    """A timeout header's value as seconds; ValueError naming the header otherwise.

    A wait must end: zero, negative, infinite and NaN are refused, not taken to mean
    "no timeout" (which is what a caller who sends none gets).
    """
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {text!r}")
    return seconds


def caller_timeout(request: httpx2.Request, timeout: Any) -> float | None:
    """How long the caller will wait for this request, if it says (seconds).

    Its headers say so first (`header_timeout`); else its `timeout` extension as the
    caller set it (`timeout`, kept by the plan before it lowers the read timeout to
    the first-byte bound), which an httpx2 client fills from its timeout: the larger
    of its pool and read parts (waiting for a node is waiting for a connection, then
    for an answer). Not where that extension is the front door's own (`OWN_TIMEOUT`).
    """
    seconds = header_timeout(request.headers)
    if seconds is not None or request.extensions.get(OWN_TIMEOUT):
        return seconds
    parts = [t for t in (timeout.get("pool"), timeout.get("read")) if t is not None]
    return max(parts) if parts else None


class Attempts:
    """The failover state of one request: nodes tried, the wait deadline, backoff."""

    def __init__(self, routing: Routing, request: httpx2.Request, label: str = "") -> None:
        self.routing = routing
        self.request = request
        self.count = 0
        self._label = label
        self._reasons: list[str] = []
        self._deadline: float | None = None
        self._nudge = 0.0  # when to tell the fleet again that this request is starved
        self._timeout = request.extensions.get("timeout") or {}  # the caller's, kept
        self._give_up = request.extensions.get(GIVE_UP)
        self.span: Any = None
        """The request's span while tracing (`trace`), else None."""
        self.callers_read = False
        """Whether the read timeout in force is the caller's own (`bound`): its
        expiry is the caller giving up, no mark against the node."""

    def bound(self, first_byte: float | None) -> bool:
        """Lower the request's read timeout to the `first_byte` bound where that is
        tighter (`first_byte_bound`); True when the bound in force is then ours.

        Otherwise the read timeout in force is the caller's (`callers_read`), unless
        the front door set it (`OWN_TIMEOUT`: the proxy's `--upstream-timeout` is the fleet's
        bound on its nodes, so its expiry counts against the node)."""
        ours = first_byte_bound(self.request, first_byte)
        read = (self.request.extensions.get("timeout") or {}).get("read")
        own = self.request.extensions.get(OWN_TIMEOUT)
        self.callers_read = not ours and read is not None and not own
        return ours

    def trace(self, info: RequestInfo) -> None:
        """Open the request's span, when tracing is on (transport/tracing.py), or go
        on with the one the fast lane opened (`REQUEST_SPAN`)."""
        request = self.request
        adopted = request.extensions.pop(REQUEST_SPAN, None)
        if adopted is not None or self.routing.tracer is None:
            self.span = adopted
            return
        self.span = open_request_span(
            self.routing,
            request.method,
            request.url.path,
            request.headers,
            request.extensions.get(REQUEST_ID),
            info,
        )

    def _trace_lease(
        self, strategy: Strategy, info: RequestInfo, node: NodeState, lease: Accounting
    ) -> None:
        """The routing decision as an event, and the attempt's own span, whose context
        the node receives."""
        lease.span = open_attempt_span(self.routing, self.span, strategy, info, node, self.count)
        tracing.inject(self.request.headers, lease.span)

    def settle(self, lease: Accounting) -> None:
        """The request's answer holds `lease`: its span ends with that stream."""
        if self.span is not None:
            lease.request_span, self.span = self.span, None

    def close_span(self, error: BaseException | str | None = None) -> None:
        """End the request's span now (an error, or a plan that ends it itself)."""
        if self.span is not None:
            span, self.span = self.span, None
            tracing.end(span, None if error is None else str(error) or type(error).__name__)

    def lease(
        self, strategy: Strategy, info: RequestInfo, tried: list[str]
    ) -> Steps[tuple[NodeState, Accounting]]:
        """Lease a node for `info` (avoiding `tried`), waiting for one while it may come.

        The wait lasts `wait_for_node`, or the caller's own timeout when that is
        shorter (a caller that gave up must not hold a place), and not at all when
        no node could ever take the request (`NodeRegistry.hopeless`: a weight
        version nobody has or brings, a role nobody has): then `NoHealthyNodeError`
        says why at once. While it waits the request holds a place in the admission
        queue (the registry's `waiting`, shared by every client and the proxy),
        given back however the wait ends: a node, `NoHealthyNodeError`, or the
        caller gone (the generator closed, as a cancelled task or a disconnected
        proxy client does). With the queue full it is refused at once
        (`FleetBusyError`): waiting requests cost memory and a poll each, so their
        number is bounded rather than left to grow with the load.

        A request that waits only for its turn (lmfleet/priority.py: a higher
        priority goes first, a background one waits for room in a full node) has
        healthy nodes: `wait_for_node` does not bound it, only the caller's timeout,
        and aging sees that its turn comes.
        """
        routing = self.routing
        ticket: int | None = None
        since: float | None = None
        pause = POLL_INTERVAL
        bell = routing.registry.doorbell
        try:
            while True:
                seen = bell.rings  # before the look: a node that comes after it rings
                node = routing.registry.lease(strategy, info, tried, ticket=ticket, since=since)
                if node is not None:
                    if routing.registry.wake_asked:  # a better tier sleeps: wake it
                        routing.registry.wake_asked = False
                        routing.starved(info)
                    tried.append(node.url)
                    self.count += 1
                    lease = Accounting(routing.registry, node.url)
                    lease.callers_read = self.callers_read
                    if self.span is not None:
                        self._trace_lease(strategy, info, node, lease)
                    return node, lease
                now = time.monotonic()
                if since is None:
                    since = now
                if self._deadline is None:
                    self._deadline = now + self._wait_for(routing.options.wait_for_node)
                if self._give_up is not None and (why := self._give_up()) is not None:
                    raise NoHealthyNodeError(why, request=self.request)
                if now >= self._nudge:
                    self._nudge = now + STARVED_EVERY
                    hopeless = routing.registry.hopeless(info)
                    if hopeless is not None:
                        raise NoHealthyNodeError(
                            f"no {_wanted(info)} can take this request: {hopeless}",
                            request=self.request,
                        )
                    routing.starved(info)
                if now >= self._deadline and not self._in_turn(info, now, since):
                    raise NoHealthyNodeError(
                        f"no healthy {_wanted(info)} within {self._waited()}; "
                        f"nodes: {self._describe_nodes()}",
                        request=self.request,
                    )
                if ticket is None:
                    ticket = self._enter_queue(info, since)
                yield Pause(min(pause, self._until_deadline(now, since)), bell, seen)
                pause = next_pause(pause, routing.registry.serving_now(info))
        finally:
            if ticket is not None:
                routing.registry.leave_queue(ticket)

    def _until_deadline(self, now: float, since: float) -> float:
        """Seconds until the wait must be judged again: the wait's deadline, or past it
        (a request waiting for its turn) the caller's own timeout; a pause never runs
        past it (a caller's timeout of 2 s gives up at 2 s)."""
        assert self._deadline is not None
        if now < self._deadline:
            return self._deadline - now
        caller = self._caller
        return math.inf if caller is None else max(since + caller - now, 0.0)

    def _in_turn(self, info: RequestInfo, now: float, since: float) -> bool:
        """Whether the request waits only for its turn (a node would take it, but a
        higher priority goes first, or it is background and every node is full), and
        the caller's own timeout has not passed: then it goes on waiting."""
        caller = self._caller
        if caller is not None and now >= since + caller:
            return False
        return self.routing.registry.serving_now(info)

    @functools.cached_property
    def _caller(self) -> float | None:
        """The caller's timeout, read only when the request has to wait for a node."""
        return caller_timeout(self.request, self._timeout)

    def _wait_for(self, wait_for_node: float) -> float:
        caller = self._caller
        return wait_for_node if caller is None else min(wait_for_node, caller)

    def _waited(self) -> str:
        """`30 s`, or `1 s (the caller's timeout)` when that cut the wait short."""
        wait_for_node = self.routing.options.wait_for_node
        if self._caller is not None and self._caller < wait_for_node:
            return f"{self._caller:g} s (the caller's timeout; wait_for_node={wait_for_node:g})"
        return f"{wait_for_node:g} s"

    def _enter_queue(self, info: RequestInfo, since: float) -> int:
        """Take a place in the admission queue (its ticket), or raise `FleetBusyError`."""
        registry, limit = self.routing.registry, self.routing.options.admission_queue
        ticket = registry.enter_queue(limit, info, since)
        if ticket is not None:
            return ticket
        error = FleetBusyError(
            f"the fleet is busy: the admission queue is full ({registry.waiting} request(s) "
            f"already wait for a {_wanted(info)}; routing.admission_queue={limit}); "
            f"try again in {BUSY_RETRY_AFTER:g} s",
            request=self.request,
        )
        error.retry_after = BUSY_RETRY_AFTER
        raise error

    def transport_failed(
        self, lease: Accounting, exc: BaseException | bytes | None, phase: str, ours: bool
    ) -> NoReturn:
        """A send that raised: `Retry` elsewhere, or re-raise (the caller's timeouts).

        `ours`: the read timeout in force was the first-byte bound, not the caller's.
        A `PoolTimeout` (every connection of our own pool stayed busy: the
        `max_connections` cap) never reached the node, so it is no mark against it,
        and another node would wait on the same pool: it goes to the caller. Nor is
        the caller's own read timeout (`callers_read`): a caller that asks for an
        answer sooner than the node can give it has given up on a node that may be
        fine (five such in a row would eject it), as a caller that disconnects has.
        """
        if isinstance(exc, httpx2.PoolTimeout) or lease.gave_up(exc):
            lease.finish(Outcome.NEUTRAL)
            raise exc
        lease.finish(Outcome.FAILURE)
        if isinstance(exc, UNREACHED_ERRORS):
            self.routing.registry.mark_failed(lease.url, f"unreachable: {exc!r}")
        elif isinstance(exc, httpx2.ReadTimeout) and ours:
            first_byte = self.routing.options.first_byte_timeout
            raise Retry(f"{phase}{lease.url} sent no first byte within {first_byte:g} s")
        elif not isinstance(exc, DROPPED_ERRORS):
            assert isinstance(exc, BaseException), "a Call's reply: a response or an error"
            raise exc  # the caller's own timeout, or our error: the caller's to handle
        raise Retry(f"{phase}{lease.url}: {exc!r}")

    def retryable(self, lease: Accounting, response: httpx2.Response, phase: str) -> str | None:
        """Why `response` should be tried on another node (a node failure), or None."""
        status = response.status_code
        if status not in self.routing.options.retry_status:
            return None
        if status in PASSIVE_STATUS:
            self.routing.registry.mark_failed(lease.url, f"answered HTTP {status}")
        return f"{phase}{lease.url} answered HTTP {status}"

    def failed(self, reason: str) -> float:
        """Record a failed attempt: the pause before the next one, or give up.

        The pause is the router's jittered exponential `Backoff`; giving up raises
        `NodeUnavailableError` naming every attempt's node and reason.
        """
        self._reasons.append(reason)
        if self.span is not None:
            self.span.add_event("failover", {"lmfleet.reason": reason})
        if self.exhausted():
            raise NodeUnavailableError(
                f"{self._label}{self.count} attempt(s) failed: {'; '.join(self._reasons)}",
                request=self.request,
            )
        return self.routing.backoff(max(1, self.count))

    def made(self, url: str, tried: list[str]) -> None:
        """Count an attempt on `url` made before the plan started (`FIRST_ATTEMPT`)."""
        tried.append(url)
        self.count += 1

    def moved(self) -> None:
        """The last attempt's node was taken away (a weight update put it to sleep), not
        failed: it does not count against `max_attempts`."""
        self.count = max(0, self.count - 1)

    def exhausted(self) -> bool:
        return self.count >= self.routing.options.max_attempts

    def _describe_nodes(self) -> str:
        nodes = self.routing.registry.snapshot()
        if not nodes:
            return "none"
        return ", ".join(
            f"{n.url} {n.status.value}" + (f" ({n.message})" if n.message else "") for n in nodes
        )


def open_request_span(
    routing: Routing,
    method: str,
    path: str,
    headers: Any,
    request_id: object,
    info: RequestInfo,
) -> Any:
    """A routed request's span (`routing.tracer` set), child of the trace context in
    the caller's `headers`: the plan's, and the fast lane's (one shape for both)."""
    return tracing.start_request(
        routing.tracer,
        method,
        path,
        headers,
        **{
            "lmfleet.request_id": request_id,
            "lmfleet.model": info.model,
            "lmfleet.strategy": as_base_strategy(routing.strategy).name,
        },
    )


def open_attempt_span(
    routing: Routing,
    span: Any,
    strategy: Strategy,
    info: RequestInfo,
    node: NodeState,
    number: int,
) -> Any:
    """The routing decision as an event of the request's `span`, and the attempt's
    own span (whose context the node receives)."""
    scored = routing.registry.candidates(strategy, info)  # no second pick
    span.add_event(
        "route",
        {
            "lmfleet.node": node.url,
            "lmfleet.strategy": as_base_strategy(strategy).name,
            "lmfleet.candidates": [
                c.url if c.score is None else f"{c.url} {c.score:.4g}" for c in scored
            ],
        },
    )
    return tracing.start_attempt(routing.tracer, span, node.url, number)


def holding(lease: Accounting, steps: Steps[T]) -> Steps[T]:
    """Run a phase's `steps` that hold `lease`. Should they end in an exception (the
    caller went away and the generator was closed, or the phase failed), the lease
    ends neutral unless the phase ended it already: a caller that gives up leaves no
    mark against the node and gives its in-flight slot back at once."""
    try:
        return (yield from steps)
    except BaseException:
        lease.finish(Outcome.NEUTRAL)  # leases end once: a no-op when already ended
        raise


def next_pause(pause: float, served: bool) -> float:
    """The pause before a waiting request's next look: `POLL_INTERVAL` while a node
    serves it (it waits for its turn or for room, which any answer may bring), else
    twice the last, up to `MAX_POLL_INTERVAL` (it waits for a node to come back)."""
    return POLL_INTERVAL if served else min(2 * pause, MAX_POLL_INTERVAL)


def _wanted(info: RequestInfo) -> str:
    """What the request waited for: `node`, `decode node serving 'm'`, ..."""
    role = f"{info.role.name.lower()} " if info.role not in (None, NodeRole.HYBRID) else ""
    model = f" serving {info.model!r}" if info.model else ""
    version = ""
    if info.weight_version is not None:
        version = f" of weight version {info.weight_version}"
    elif info.min_weight_version is not None:
        version = f" of weight version >= {info.min_weight_version}"
    if info.max_staleness is not None:
        version += f" within {info.max_staleness} version(s) of the newest"
    return f"{role}node{model}{version}"


class RequestPlan:
    """A request for one node (any role but DistServe's P->D): `steps()` is the plan."""

    def __init__(self, routing: Routing, request: httpx2.Request, info: RequestInfo) -> None:
        self.routing = routing
        self.request = request
        self.info = info
        self.immediate: httpx2.Response | None = None
        """An answer decided without any node (an unknown model, a rejected option)."""

    def steps(self) -> Steps[httpx2.Response]:
        if self.immediate is not None:
            return self.immediate
        routing = self.routing
        attempts = Attempts(routing, self.request)
        attempts.trace(self.info)
        ours = attempts.bound(routing.options.first_byte_timeout)
        tried: list[str] = []
        made = self.request.extensions.pop(FIRST_ATTEMPT, None)
        try:
            while True:
                if made is not None:  # judged first, as if this plan had made it
                    node, lease, reply = made
                    made = None
                    attempts.made(node.url, tried)
                    phase = self._judge(node, lease, attempts, ours, reply, self.request)
                else:
                    node, lease = yield from attempts.lease(routing.strategy, self.info, tried)
                    routing.nodes.aim(self.request, node)
                    phase = self._send(node, lease, attempts, ours)
                try:
                    answer = yield from holding(lease, phase)
                except Retry as retry:
                    yield Pause(attempts.failed(retry.reason))
                    continue
                self._settle(attempts, lease)
                return answer
        except BaseException as exc:
            attempts.close_span(exc)
            raise

    def _settle(self, attempts: Attempts, lease: Accounting) -> None:
        """The answer holds `lease`: the request's span ends with its stream."""
        attempts.settle(lease)

    def _send(
        self, node: NodeState, lease: Accounting, attempts: Attempts, ours: bool
    ) -> Steps[httpx2.Response]:
        """One attempt on `node`: its answer for the caller, or `Retry`.

        A request for an alias goes as a copy naming the node's own model, and its
        answer names the alias again (lmfleet/transport/renaming.py)."""
        request, asked = self.request, self.info.model
        own = asked if asked is None else self.routing.registry.own_name(node, asked)
        if own is not None and asked is not None and own != asked:
            request = renamed_request(request, asked, own)
        reply = yield Call(request, stream=True, first_byte=True)
        return (yield from self._judge(node, lease, attempts, ours, reply, request, own))

    def _judge(
        self,
        node: NodeState,
        lease: Accounting,
        attempts: Attempts,
        ours: bool,
        reply: Any,
        request: httpx2.Request,
        own: str | None = None,
    ) -> Steps[httpx2.Response]:
        """What `reply` from `node` (a response, or the transport's error) makes of the
        attempt: the caller's answer, or `Retry`. `request` is what was sent: a copy
        naming the node's `own` name for the model when the caller asked for an alias."""
        asked = self.info.model
        if not isinstance(reply, httpx2.Response):
            attempts.transport_failed(lease, reply, "", ours)
        reason = attempts.retryable(lease, reply, "")
        if request is not self.request and (reason is None or attempts.exhausted()):
            assert own is not None and asked is not None
            rename_answer(reply, own, asked)  # the caller reads the name it asked for
        if reason is None:
            set_header(reply.headers, SERVED_VERSION_NAME, b"%d" % node.weight_version)
            return lease_response(reply, lease)
        if attempts.exhausted():
            return final_answer(reply, lease)
        yield Discard(reply)
        lease.finish(Outcome.FAILURE)
        raise Retry(reason)


def final_answer(response: httpx2.Response, lease: Accounting) -> httpx2.Response:
    """The last node's failing answer, for the caller, marked: do not retry it again."""
    response.headers["x-should-retry"] = "false"
    return lease_response(response, lease)


def error_answer(
    request: httpx2.Request, row: Answer, message: str, *, param: str | None = None
) -> httpx2.Response:
    """An answer decided without any node (`RequestPlan.immediate`), from its row of
    the answers table, in LMDeploy's OpenAI-shaped error body, as a node would give it."""
    return httpx2.Response(
        row.status,
        headers={"content-type": "application/json"},
        content=error_bytes(message, code=row.status, type=row.error_type, param=param),
        request=request,
        extensions={ANSWER_KIND: row.kind},
    )
