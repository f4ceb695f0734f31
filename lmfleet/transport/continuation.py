"""Token-in, token-out generations that survive their node (LMDeploy's and
SGLang's `/generate`, vLLM's `/inference/v1/generate`: transport/token_dialects.py).

The fleet always asks the node for a stream, even when its caller did not, and
follows the generation token by token. When the node stops before the generation
ended (it died, it went silent for `stall_timeout`, or a weight update with
`in_flight="continue"` put it to sleep, which aborts every request on it), the
fleet sends the rest to another node of the same engine: the same body, with the
prompt's ids followed by every output id received so far and the token budget
reduced by their number. A greedy generation so continued equals the
uninterrupted one token for token (the model sees the same sequence); the caller
gets one answer: one uninterrupted event stream, or, when it did not ask for a
stream, the answer assembled as its engine assembles its own (LMDeploy: `text`
and `output_ids` concatenated, `meta_info` of the last event, logprob lists
joined; vLLM: one choice with every `token_ids`).

A generation whose tokens came from more than one weight version says so:
`meta_info.weight_versions` (in the assembled answer and in a stream's last
event; vLLM: the choice's own `weight_versions` spans) lists `[start, end,
version]` over output tokens, and an assembled answer
also carries it as the `x-lmfleet-weight-versions` header (`0-120:3,120-400:4`).

Only the token routes are continued. LMDeploy's text `prompt` is continued from
its ids too: the next node's `/v1/encode` (no chat template, with BOS: how
`/generate` tokenizes a prompt) gives them once, at the first cut; a node without
that route (and SGLang's `text`) gets the prompt followed by the text so far
(re-tokenized there: the seam may tokenize differently). Scoring requests
(`logprob_start_len`), and SGLang's and vLLM's with logprobs, are not continued. Chat and
completions keep the plain plan: a cut after the first byte is the caller's
`StreamInterruptedError`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx2

from lmfleet.answers import error_body
from lmfleet.errors import LMFleetError, UnknownNodeError
from lmfleet.node.outliers import Outcome
from lmfleet.node.state import NodeState
from lmfleet.routing.base import RequestInfo
from lmfleet.transport import tracing
from lmfleet.transport.plan import (
    OWN_TIMEOUT,
    SERVED_VERSION_HEADER,
    Attempts,
    RequestPlan,
    Retry,
    Routing,
    final_answer,
    holding,
)
from lmfleet.transport.request import REQUEST_ID
from lmfleet.transport.steps import Call, Discard, Emit, Pause, Read, Reply, Steps, StepsBody
from lmfleet.transport.streams import Accounting, lease_response
from lmfleet.transport.token_dialects import LMDEPLOY, Generation, TokenDialect

ENCODE = "/v1/encode"
VERSIONS_HEADER = "x-lmfleet-weight-versions"
"""On an assembled `/generate` answer: the weight versions its tokens came from."""
_DONE = b"[DONE]"
_COMPACT = (",", ":")  # pydantic's model_dump_json, which LMDeploy's events use


def wants_continuation(
    request: httpx2.Request, body: dict[str, Any] | None, dialect: TokenDialect
) -> bool:
    """A token-route generation the fleet can continue (`TokenDialect.continuable`)."""
    if request.method != "POST" or request.url.path != dialect.path or body is None:
        return False
    return dialect.continuable(body)


def _events(buffer: bytearray, chunk: bytes) -> Iterator[bytes]:
    """The `data:` payloads of the complete events in `buffer` + `chunk`."""
    buffer += chunk.replace(b"\r\n", b"\n")
    while (end := buffer.find(b"\n\n")) >= 0:
        raw = bytes(buffer[:end])
        del buffer[: end + 2]
        data = b"\n".join(
            line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")
        )
        if data:
            yield data


class ContinuedGeneration(RequestPlan):
    """A `/generate` request followed token by token and continued on another node
    when its node stops early (see the module docstring)."""

    def __init__(
        self,
        routing: Routing,
        request: httpx2.Request,
        info: RequestInfo,
        body: dict[str, Any],
        dialect: TokenDialect = LMDEPLOY,
    ) -> None:
        super().__init__(routing, request, info)
        self.gen = Generation(body, stream=bool(body.get("stream")), dialect=dialect)
        # The caller's own read timeout (not the proxy's upstream one), kept before the
        # plan lowers the request's to the first-byte bound. It bounds the caller's
        # silence: between two events of a stream, or the whole wait for an assembled
        # answer, which the caller receives in one piece at the end.
        own = request.extensions.get(OWN_TIMEOUT)
        read = None if own else (request.extensions.get("timeout") or {}).get("read")
        self._caller_read: float | None = read
        self._deadline = math.inf
        if read is not None and not self.gen.stream:
            self._deadline = time.monotonic() + read
        self._tried: list[str] = []  # every node the generation was sent to
        self._followed = False

    def _settle(self, attempts: Attempts, lease: Accounting) -> None:
        """A followed generation ends the request's span itself (`_follow`); a refusal
        ends it with its answer's stream."""
        if not self._followed:
            attempts.settle(lease)

    def _send(
        self, node: NodeState, lease: Accounting, attempts: Attempts, ours: bool
    ) -> Steps[httpx2.Response]:
        """One attempt (`RequestPlan.steps` fails over before the first byte): the
        node's refusal as it is, else the followed generation, streamed or assembled."""
        self._tried.append(node.url)
        opened = yield from self._open(node, lease, attempts, ours)
        if opened.status_code != 200:
            return opened  # the node's own answer (a refusal): the caller's
        self._followed = True  # the request's span ends with the followed generation
        body = self._follow(node, lease, opened, attempts, ours)
        if not self.gen.stream:
            return (yield from self._assemble(body))
        return httpx2.Response(
            200,
            headers={
                "content-type": "text/event-stream",
                SERVED_VERSION_HEADER: str(node.weight_version),
            },
            stream=StepsBody(body),
            request=self.request,
        )

    def _open(
        self, node: NodeState, lease: Accounting, attempts: Attempts, ours: bool
    ) -> Steps[httpx2.Response]:
        """Send the generation (or its rest) to `node`; its open event stream, or a
        non-200 answer for the caller, or `Retry` (no byte reached the caller)."""
        timeout = self.request.extensions.get("timeout", {})
        reply: Reply = None
        if self.gen.needs_prompt_ids:
            reply = yield from self._encode(node, timeout)
        session = self.gen.session()
        if reply is None:
            body = self.gen.request_body(session)
            path = self.gen.dialect.path
            request = self.routing.nodes.request(node, "POST", path, json=body, timeout=timeout)
            if lease.span is not None:
                tracing.inject(request.headers, lease.span)
            reply = yield Call(request, stream=True, first_byte=True)
        if not isinstance(reply, httpx2.Response):
            attempts.transport_failed(lease, reply, "", ours)
        reason = attempts.retryable(lease, reply, "")
        if reason is not None:
            if attempts.exhausted():
                return final_answer(reply, lease)
            yield Discard(reply)
            lease.finish(Outcome.FAILURE)
            raise Retry(reason)
        if reply.status_code != 200:  # the node's refusal, marked as any answer is
            reply.headers[SERVED_VERSION_HEADER] = str(node.weight_version)
            return lease_response(reply, lease)
        request_id = self.request.extensions.get(REQUEST_ID)
        if request_id is not None:  # abortable by its id from now on (fleet.abort)
            self.routing.registry.track(request_id, node.url, session)
        return reply

    def _encode(self, node: NodeState, timeout: Any) -> Steps[Reply]:
        """Ask `node` for the ids of the generation's text prompt, as `/generate`
        makes them; None when it answered, else the transport error it raised."""
        text = {"input": self.gen.body.get("prompt"), "do_preprocess": False, "add_bos": True}
        request = self.routing.nodes.request(node, "POST", ENCODE, json=text, timeout=timeout)
        encoded = yield Call(request)
        if isinstance(encoded, httpx2.Response):
            self.gen.take_encoded(encoded)
            return None
        return encoded

    def _follow(
        self,
        node: NodeState,
        lease: Accounting,
        reply: httpx2.Response,
        attempts: Attempts,
        ours: bool,
    ) -> Steps[None]:
        """Relay the generation's events (`Emit`), continuing it on another node each
        time its node stops early, while attempts last; a cut that cannot be
        continued ends the stream with an error event."""
        try:
            while True:
                cut = yield from self._relay(node, lease, reply)
                if cut is None:
                    yield Emit(b"data: [DONE]\n\n")
                    return
                if attempts.span is not None:
                    made = {"lmfleet.reason": cut, "lmfleet.tokens": len(self.gen.output_ids)}
                    attempts.span.add_event("continuation", made)
                if cut is _MOVED:
                    attempts.moved()  # an update's cut is no attempt used up, and no pause
                while True:  # the rest, on another node (`failed` raises when none is left)
                    if cut is not _MOVED:
                        yield Pause(attempts.failed(cut))
                    node, lease = yield from attempts.lease(
                        self.routing.strategy, self.info, self._tried
                    )
                    try:
                        opened = yield from holding(lease, self._open(node, lease, attempts, ours))
                    except Retry as retry:
                        cut = retry.reason  # a failure: counted, and paused for
                        continue
                    if opened.status_code != 200:
                        yield Discard(opened)
                        yield Emit(
                            _error_event(f"{node.url} refused the rest: {opened.status_code}")
                        )
                        return
                    reply = opened
                    self.gen.continued += 1
                    break
        except (LMFleetError, httpx2.TransportError) as exc:
            if isinstance(exc, _CallersTimeout):
                attempts.close_span(exc)
                raise  # the caller's own timeout: its error, as for any request
            attempts.close_span(exc)
            yield Emit(_error_event(str(exc)))
        finally:
            attempts.close_span()
            request_id = self.request.extensions.get(REQUEST_ID)
            if request_id is not None:
                self.routing.registry.untrack(request_id)

    def _relay(
        self, node: NodeState, lease: Accounting, reply: httpx2.Response
    ) -> Steps[str | None]:
        """Read `reply` to its end or its cut, emitting its events for a streaming
        caller: None when the generation ended, else why it must go on elsewhere."""
        lease.sse = True
        cut, outcome = yield from holding(lease, self._read(node, lease, reply))
        lease.complete = outcome is Outcome.SUCCESS
        lease.finish(outcome)
        yield Discard(reply)
        return cut

    def _read(
        self, node: NodeState, lease: Accounting, reply: httpx2.Response
    ) -> Steps[tuple[str | None, Outcome]]:
        gen = self.gen
        stall = self.routing.options.stall_timeout
        buffer = bytearray()
        while True:
            timeout, callers = self._read_timeout(stall if gen.output_ids else None)
            chunk = yield Read(reply, timeout=timeout)
            if isinstance(chunk, httpx2.TimeoutException):
                if callers:
                    raise _CallersTimeout(
                        f"no answer within the caller's read timeout ({self._caller_read:g} s)"
                    )
                return f"{node.url} stalled: no token for {stall:g} s", Outcome.FAILURE
            if isinstance(chunk, httpx2.TransportError):
                return f"{node.url} cut the generation: {chunk!r}", Outcome.FAILURE
            if not isinstance(chunk, bytes) or not chunk:
                if gen.done:
                    return None, Outcome.SUCCESS
                return f"{node.url} ended its stream early", Outcome.FAILURE
            lease.chunk()
            for data in _events(buffer, chunk):
                if data == _DONE:
                    continue
                if gen.plain_token(data, node.weight_version):
                    if gen.stream:  # recorded without a parse: relayed as it came
                        yield Emit(b"data: " + data + b"\n\n")
                    continue
                event = json.loads(data)
                if not isinstance(event, dict) or "error" in event:
                    yield Emit(b"data: " + data + b"\n\n")  # the node's own error: the end
                    return None, Outcome.FAILURE
                shown = gen.add(event, node.weight_version)
                if gen.aborted and self._cut_for_update(node):
                    gen.finish = None  # cut for a weight update: not the caller's end
                    return _MOVED, Outcome.NEUTRAL
                if gen.stream:  # the node's own bytes, unless the fleet changed the event
                    yield Emit(b"data: " + (data if shown is event else _dumps(shown)) + b"\n\n")

    def _read_timeout(self, stall: float | None) -> tuple[float | None, bool]:
        """The bound on the next read, and whether it is the caller's own: the stall
        bound, or the caller's read timeout when tighter (per event for a stream; what
        is left of it for an assembled answer)."""
        callers = self._caller_read if self.gen.stream else self._deadline - time.monotonic()
        if callers is not None and callers <= 0:
            raise _CallersTimeout(
                f"no answer within the caller's read timeout ({self._caller_read:g} s)"
            )
        if callers is None or callers == math.inf or (stall is not None and stall < callers):
            return stall, False
        return callers, True

    def _cut_for_update(self, node: NodeState) -> bool:
        """Whether `node` aborted the generation for a weight update that continues
        it: its count of such cuts grew since it was leased (`node`, the snapshot
        the lease took under the registry's lock, where the update marks the node
        asleep and counts the cut in one step, so no lease falls in between)."""
        try:
            now = self.routing.registry.get(node.url)
        except UnknownNodeError:
            return False
        return now.cuts > node.cuts

    def _assemble(self, body: Steps[None]) -> Steps[httpx2.Response]:
        """Run the followed generation to its end: the answer a non-streamed call gets."""
        error: bytes | None = None
        reply: Any = None
        try:
            while True:
                try:
                    step = body.send(reply)
                except StopIteration:
                    break
                if isinstance(step, Emit):
                    if step.chunk.startswith(_ERROR_EVENT):
                        error = step.chunk
                    reply = None
                    continue
                reply = yield step
        finally:
            body.close()
        if error is not None:
            problem = json.loads(error[len(b"data: ") :])["error"]
            return httpx2.Response(
                502,
                json={"error": problem},
                headers={"x-should-retry": "false"},
                request=self.request,
            )
        gen = self.gen
        return httpx2.Response(
            200,
            content=_dumps(gen.assembled()),
            headers={
                "content-type": "application/json",
                SERVED_VERSION_HEADER: str(gen.versions[-1][2] if gen.versions else 0),
                VERSIONS_HEADER: gen.versions_header(),
            },
            request=self.request,
        )


def parse_versions(header: str) -> list[list[int]] | None:
    """`x-lmfleet-weight-versions` (`0-120:3,120-400:4`) as `[[0, 120, 3], ...]`;
    None when it is not that."""
    segments = []
    for part in filter(None, header.split(",")):
        span, _, version = part.partition(":")
        start, _, end = span.partition("-")
        try:
            segments.append([int(start), int(end), int(version)])
        except ValueError:
            return None
    return segments


class _CallersTimeout(httpx2.ReadTimeout):
    """The caller's own read timeout ran out: its error, not a cut to continue."""


_ERROR_EVENT = b'data: {"error"'
_MOVED = "its node was put to sleep for a weight update"
"""The cut a weight update makes (`in_flight="continue"`): not the node's failure."""


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=_COMPACT, ensure_ascii=False).encode()


def _error_event(message: str) -> bytes:
    """The event that ends a generation that could not be continued (as the proxy
    ends a cut stream: openai clients raise it as an `APIError`)."""
    text = f"the generation could not be finished: {message}"
    return (
        b"data: " + _dumps({"error": error_body(text, code=502, type="internal_error")}) + b"\n\n"
    )
