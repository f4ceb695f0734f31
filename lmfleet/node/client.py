"""`NodeClient`: the one place that builds a request to a node and reads its failure.

Every request lmfleet sends a node is built here, with the node's URL, its own key
(`auth_headers`, the one header builder) and a timeout, and every way such a call
can fail is mapped here to one error (`NodeCallError`: unreachable, or an HTTP
status with the node's text). The engine's routes come from its `EngineProfile`.

Two wires carry these requests, chosen by how often they are sent (measured:
`bench/node_calls.py`, docs/benchmarks.md §1):

- the per-round GETs (`/health`, `/metrics`) and the routed requests' upstream
  are the hot paths: the lean HTTP/1.1 prober and upstream pool (`lmfleet.wire`),
  fed the `ProbeRequest` and the headers built here;
- commands (`/is_sleeping`, `/v1/models`, sleep, wakeup, abort, weights,
  DistServe control) are a few per node per minute at most, carry JSON bodies up
  to the size of a weight bucket, and must also run from a sync client's thread
  (DistServe's steps): they go through httpx2, whose per-call CPU cost (5 to 7
  times the prober's: about 0.4 ms against 0.07 ms) is about 0.01 % of a core at
  64 nodes and a few commands a minute each.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import httpx2

from lmfleet.errors import EngineCapabilityError, NodeCommandError
from lmfleet.node.profile import Command, EngineProfile, Params, profile_named, recognise
from lmfleet.wire.headers import set_header
from lmfleet.wire.prober import ProbeRequest

URL_CACHE_SIZE = 4096
"""Parsed URLs kept per cache (`UrlCache`); cleared whole when full (query strings vary)."""


class Node(Protocol):
    """What addressing a node needs: `NodeState` has it, and so does `NodeAddress`."""

    @property
    def url(self) -> str: ...

    @property
    def api_key(self) -> str | None: ...

    @property
    def headers(self) -> tuple[tuple[str, str], ...]: ...

    @property
    def engine(self) -> str | None: ...


class NodeAddress:
    """A node's URL, key, headers and engine where no `NodeState` is at hand (a node
    just removed)."""

    __slots__ = ("api_key", "engine", "headers", "url")

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        engine: str | None = None,
    ) -> None:
        self.url = url
        self.api_key = api_key
        self.headers = headers
        self.engine = engine


@functools.lru_cache(maxsize=256)
def auth_headers(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The node's own key as a Bearer token, or nothing: the only place it is spelt."""
    return (("Authorization", f"Bearer {api_key}"),) if api_key else ()


def node_headers(node: Node) -> tuple[tuple[str, str], ...]:
    """What every request to `node` carries: its key, then its own extra headers
    (`NodeOptions`; one of those may be an `Authorization` of its own gateway)."""
    extra = node.headers
    return auth_headers(node.api_key) + extra if extra else auth_headers(node.api_key)


class NodeCallError(NodeCommandError):
    """A call to a node failed: it could not be reached (`status` None) or it answered
    `status` (not 2xx) with `text`. Raised, or chained into their own errors, by every
    caller of `NodeClient`: the message is the same wherever the call came from."""

    def __init__(
        self, node: str, method: str, path: str, *, status: int | None, detail: str
    ) -> None:
        self.node, self.method, self.path = node, method, path
        self.status, self.text = status, detail if status is not None else ""
        what = f"{method} {node}{path}"
        said = "failed:" if status is None else f"answered HTTP {status}:"
        hint = _KEY_HINT if status in (401, 403) else ""
        super().__init__(f"{what} {said} {detail}{hint}")


_KEY_HINT = (
    " (check the key the fleet sends the node: LMFleet.attach(api_key=...), "
    "lmfleet serve --node-api-key, or the node's own key-env=)"
)


def call_failed(node: str, request: httpx2.Request, outcome: Any) -> NodeCallError | None:
    """The error of one call, from what its transport gave back (a response, an
    exception, or None), or None for a 2xx answer. The one error mapping."""
    path = request.url.raw_path.decode("ascii", "replace").split("?")[0]
    if isinstance(outcome, httpx2.Response):
        if 200 <= outcome.status_code < 300:
            return None
        try:
            text = outcome.text[:300]
        except (httpx2.HTTPError, RuntimeError):  # a streamed body not read
            text = ""
        return NodeCallError(node, request.method, path, status=outcome.status_code, detail=text)
    detail = f"{type(outcome).__name__}: {outcome}" if outcome is not None else "no answer"
    return NodeCallError(node, request.method, path, status=None, detail=detail)


def _phases(timeout: float | Mapping[str, float | None]) -> dict[str, float | None]:
    if isinstance(timeout, Mapping):
        return dict(timeout)
    return {phase: timeout for phase in ("connect", "read", "write", "pool")}


class UrlCache:
    """Parsed `httpx2.URL`s by (base, path): parsing one is the costliest step of
    aiming a request, and requests go to a handful of paths on a handful of nodes.
    The key is the raw pieces, so a hit costs no decoding or joining."""

    __slots__ = ("_urls",)

    def __init__(self) -> None:
        self._urls: dict[tuple[str, bytes], httpx2.URL] = {}

    def __call__(self, base: str, path: bytes) -> httpx2.URL:
        """The URL `base` + `path` (`path` raw, the query included)."""
        key = (base, path)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= URL_CACHE_SIZE:
                self._urls.clear()
            url = self._urls[key] = httpx2.URL(base + path.decode("latin-1"))
        return url


class NodeClient:
    """Requests to nodes: built with their key and timeout, sent, failures mapped.

    `http` carries the commands (see the module's note on the two wires); the fleet
    owns it and closes it. One client serves every node of a fleet, each through its
    engine's profile (`profile_of`).
    """

    def __init__(self, http: httpx2.AsyncClient | None = None):
        self._http = http
        self._urls = UrlCache()

    @staticmethod
    def profile_of(node: Node) -> EngineProfile:
        """The node's engine profile (LMDeploy's until its engine is known)."""
        return profile_named(node.engine)

    # -- building ---------------------------------------------------------------

    def aim(self, request: httpx2.Request, node: Node) -> None:
        """Point a routed `request` at `node`: its URL, Host and the node's own key."""
        url = self._urls(node.url, request.url.raw_path)
        request.url = url
        set_header(request.headers, b"Host", url.netloc)
        for name, value in node_headers(node):
            request.headers[name] = value

    def request(
        self,
        node: Node,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        json: Any = None,
        timeout: float | Mapping[str, float | None],
    ) -> httpx2.Request:
        """A command to `node`, ready to send (by `call`, or by a transport's step).
        `timeout`: seconds for every phase, or httpx2's per-phase mapping (a routed
        request's own timeouts, when the command stands in for it)."""
        headers = dict(node_headers(node))
        if json is not None or method == "POST":
            # LMDeploy answers /sleep and /wakeup, which have no body, 400 without it.
            headers["Content-Type"] = "application/json"
        return httpx2.Request(
            method,
            node.url + path,
            params=tuple(params) if params else None,
            json=json,
            headers=headers,
            extensions={"timeout": _phases(timeout)},
        )

    def probe(self, node: Node, paths: tuple[str, ...]) -> ProbeRequest:
        """GETs of `paths` for the prober, with the node's key."""
        return ProbeRequest(node.url, paths, node_headers(node))

    # -- sending ----------------------------------------------------------------

    async def call(
        self,
        node: Node,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        json: Any = None,
        timeout: float,
    ) -> httpx2.Response:
        """Send a command; its 2xx response, else `NodeCallError`."""
        assert self._http is not None, "this NodeClient only builds requests"
        request = self.request(node, method, path, params=params, json=json, timeout=timeout)
        try:
            response = await self._http.send(request)
        except httpx2.HTTPError as exc:
            unreachable = call_failed(node.url, request, exc)
            assert unreachable is not None
            raise unreachable from exc
        error = call_failed(node.url, request, response)
        if error is not None:
            raise error
        return response

    async def call_json(
        self,
        node: Node,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        json: Any = None,
        timeout: float,
    ) -> Any:
        """`call`, then the answer's JSON (None for a body that is not JSON)."""
        response = await self.call(node, method, path, params=params, json=json, timeout=timeout)
        try:
            return response.json()
        except ValueError:
            return None

    # -- the engine's routes ----------------------------------------------------

    async def is_sleeping(self, node: Node, timeout: float) -> bool | None:
        """The engine's immediate sleep flag; None where it has none or did not say."""
        path = self.profile_of(node).is_sleeping
        value = await self._field(node, path, "is_sleeping", timeout)
        return value if isinstance(value, bool) else None

    async def models(self, node: Node, timeout: float) -> tuple[str, ...]:
        """The model ids the node serves; `NodeCallError` if it cannot say."""
        return (await self.identify(node, timeout))[0]

    async def identify(self, node: Node, timeout: float) -> tuple[tuple[str, ...], EngineProfile]:
        """The model ids the node serves and the engine serving them, recognised from
        the same `/v1/models` answer (its cards' `owned_by`) unless the node's engine
        is given; `NodeCallError` if it cannot say."""
        path = self.profile_of(node).models
        body = await self.call_json(node, "GET", path, timeout=timeout)
        try:
            models = tuple(str(item["id"]) for item in body["data"])
        except (KeyError, TypeError) as exc:
            raise NodeCallError(
                node.url, "GET", path, status=None, detail="an unexpected body"
            ) from exc
        return models, self.profile_of(node) if node.engine else recognise(body)

    async def version(self, node: Node, profile: EngineProfile, timeout: float) -> str | None:
        """The engine's version as the node reports it; None where it does not say."""
        if profile.version is None:
            return None
        path, name = profile.version
        value = await self._field(node, path, name, timeout)
        return str(value) if isinstance(value, str | int | float) else None

    async def keeps_weights(self, node: Node, timeout: float) -> bool | None:
        """Whether a level-1 sleep keeps the node's weights: True where the engine
        always does; SGLang's `enable_weights_cpu_backup` as its `/server_info` says
        (found at any depth); None where it did not say."""
        check = self.profile_of(node).keeps_weights
        if check is None:
            return True
        path, setting = check
        try:
            answer = await self.call_json(node, "GET", path, timeout=timeout)
        except NodeCallError:
            return None
        found = _setting(answer, setting)
        return found if isinstance(found, bool) else None

    async def run(
        self, node: Node, build: Callable[[EngineProfile], Command], timeout: float
    ) -> httpx2.Response:
        """Send the command `build` makes from the node's engine profile (recognised
        first from its `/v1/models` when not known yet: a command must never go to
        another engine's route). What the engine cannot do, or not as it was started
        (a 404 or 405: no such route), is an `EngineCapabilityError` with the
        profile's hint."""
        profile = self.profile_of(node)
        if node.engine is None:
            # Unless it does not say: LMDeploy's routes, and the node's own answer.
            with contextlib.suppress(NodeCallError):
                profile = (await self.identify(node, timeout))[1]
        try:
            command = build(profile)
        except EngineCapabilityError as exc:
            raise EngineCapabilityError(
                exc.engine, exc.capability, node=node.url, hint=exc.hint
            ) from None
        try:
            return await self.call(
                node,
                command.method,
                command.path,
                params=command.params,
                json=command.json,
                timeout=timeout,
            )
        except NodeCallError as exc:
            if exc.status in (404, 405):
                raise EngineCapabilityError(
                    profile.title,
                    f"{command.method} {command.path} (HTTP {exc.status})",
                    node=node.url,
                    hint=f"start it with {profile.needs}" if profile.needs else "",
                ) from exc
            raise

    async def sleep(self, node: Node, level: int, timeout: float) -> None:
        await self.run(node, lambda profile: profile.sleep(level), timeout)

    async def wakeup(self, node: Node, tags: Sequence[str] | None, timeout: float) -> None:
        await self.run(node, lambda profile: profile.wakeup(tags), timeout)

    async def terminate(self, node: Node, timeout: float) -> None:
        """Ask the node's process to exit; `NodeCallError` where it won't,
        `EngineCapabilityError` where its engine can't."""
        await self.run(node, lambda p: Command("GET", p.route(p.terminate, "terminate")), timeout)

    async def abort(self, node: Node, session_id: int | str | None, timeout: float) -> None:
        """Abort one request (its engine session) or, with None, every request on the
        node; `NodeCallError` where the engine refuses (LMDeploy: 501 without
        `--enable-abort-handling`, 400 for a session it does not know),
        `EngineCapabilityError` where it has no such route."""
        await self.run(node, lambda profile: profile.abort(session_id), timeout)

    async def weights_backend(self, node: Node, timeout: float) -> str | None:
        """The backend that would load pushed weights, or None where the node does not say."""
        path = self.profile_of(node).weights_backend
        value = await self._field(node, path, "backend", timeout)
        return value if isinstance(value, str) else None

    async def _field(self, node: Node, path: str | None, name: str, timeout: float) -> Any:
        """One field of a GET's JSON object answer; None where the engine has no such
        route, the call failed or the answer has no such field: a question the node
        could not answer is not an error for the caller."""
        if path is None:
            return None
        try:
            body = await self.call_json(node, "GET", path, timeout=timeout)
        except NodeCallError:
            return None
        return body.get(name) if isinstance(body, dict) else None


def _setting(answer: Any, name: str) -> Any:
    """The value of `name` anywhere in a JSON answer (SGLang nests its settings by
    group); None when absent."""
    if isinstance(answer, dict):
        if name in answer:
            return answer[name]
        for value in answer.values():
            found = _setting(value, name)
            if found is not None:
                return found
    return None
