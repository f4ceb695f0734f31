"""The one contract every routing strategy implements, and the base that declares the rest.

A strategy is a small chooser over immutable snapshots that the registry has
already filtered (healthy, serving the model, not excluded by failover). It does
no I/O and holds no lock; randomness and time are injected so tests are exact.

`Strategy` is the contract: one method, `pick`. Everything else a strategy may
say about itself is declared data on `BaseStrategy`, which every strategy in
`lmfleet.routing` inherits: its `name`, what routing must fetch for it
(`CAPABILITIES`: node load from `/metrics`, the request's affinity key), and a
default `explain`. A misspelt declaration is a `TypeError` when the class is
defined, and a misspelt read is a mypy error. A user's object with only `pick`
is adapted by `as_base_strategy` (`PlainStrategy`).
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol, runtime_checkable

from lmfleet.node.state import NodeRole, NodeState


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a strategy may know about the request being routed.

    `affinity_key` is only computed for strategies that set
    `uses_affinity_key = True` (reading the body costs time on the hot path).
    `role` limits the candidates to nodes of that role (DistServe's prefill and
    decode phases); None, the Hybrid default, means any role.
    `weight_version` asks for nodes of exactly that weight version (a batch that
    must not mix versions), `min_weight_version` for at least that one, and
    `max_staleness` for nodes within that many versions of the newest in the fleet
    (asynchronous RL: rollouts keep flowing through a rolling update, off-policy by
    at most k versions). `priority`: the request's (lmfleet/priority.py; higher goes
    first when requests wait, and a negative one is not sent to a full node).
    `engine` limits the candidates to nodes of that engine (a token route speaks
    one engine's dialect); nodes not identified yet qualify.
    """

    model: str | None = None
    affinity_key: str | None = None
    role: NodeRole | None = None
    weight_version: int | None = None
    min_weight_version: int | None = None
    max_staleness: int | None = None
    priority: int = 0
    engine: str | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """One eligible node as a strategy saw it: its `score` (lower wins, in the
    strategy's own unit) and the reason in words."""

    url: str
    score: float | None
    why: str


@dataclass(frozen=True, slots=True)
class Decision:
    """Which node a strategy would pick now, among which candidates, and why."""

    strategy: str
    chosen: str | None
    candidates: tuple[Candidate, ...]
    note: str = ""


@runtime_checkable
class Strategy(Protocol):
    """Pick one node among `nodes` (never empty) for `request`.

    `nodes` is the registry's own list, kept between requests: read it, never change it.

    Returning None means "none of these is acceptable right now" and makes the
    router wait as if no node were eligible. Any object with this method routes;
    inherit `BaseStrategy` to declare what else it needs.
    """

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None: ...


class BaseStrategy(ABC):
    """A `Strategy` that declares what routing must fetch for it and how it explains a pick.

    Subclasses implement `pick` and set the class attributes they need:

        class Sticky(BaseStrategy):
            name = "sticky"
            uses_affinity_key = True

            def pick(self, nodes, request): ...

    A class attribute that looks like a capability but is not one (`uses_node_lod`,
    `wants_affinity_key`) or a capability that is not a bool raises `TypeError`
    when the class is defined.
    """

    name: ClassVar[str] = "BaseStrategy"
    """What `fleet.explain()` calls it; the class name unless a class in its MRO sets one."""
    uses_node_load: ClassVar[bool] = False
    """It reads `NodeState.load`: the fleet's monitor reads every node's `/metrics`
    each health round (otherwise only as often as the views need them)."""
    uses_affinity_key: ClassVar[bool] = False
    """It reads `RequestInfo.affinity_key`: the router reads request bodies to compute
    it (a cost on the hot path that other strategies do not pay)."""

    _declares_name: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_declarations(cls.__qualname__, vars(cls))
        if "name" in vars(cls):
            cls._declares_name = True
        elif not cls._declares_name:
            cls.name = cls.__name__

    @abstractmethod
    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        """The one method of `Strategy`: a node among `nodes` (never empty), or None."""

    def explain(self, nodes: Sequence[NodeState], request: RequestInfo) -> list[Candidate]:
        """Each candidate with its score and the reason in words (`fleet.explain()`).

        By default no score, and the node's count of this process's requests in
        flight; strategies that score nodes override it.
        """
        return [Candidate(n.url, None, f"{n.inflight} of our requests in flight") for n in nodes]

    def explain_note(self, nodes: Sequence[NodeState], request: RequestInfo) -> str:
        """What a reader of `fleet.explain()` must know about how a pick of `request`
        among `nodes` is made beyond the scores (a sampled pick need not be the
        lowest); "" if nothing."""
        return ""


CAPABILITIES: Final[frozenset[str]] = frozenset(
    attr for attr in BaseStrategy.__annotations__ if attr.startswith("uses_")
)
"""What a strategy can declare that it needs, each a `ClassVar[bool]` on `BaseStrategy`."""

_CAPABILITY_PREFIXES = ("uses_", "wants_", "needs_")
"""Attribute names that only a capability should have; anything else close to one
(`use_node_load`, `uses_nodeload`) is caught as a typo too."""


def _looks_like_capability(attr: str) -> bool:
    if attr.startswith("_"):
        return False
    if attr in CAPABILITIES or attr.startswith(_CAPABILITY_PREFIXES):
        return True
    return bool(difflib.get_close_matches(attr, CAPABILITIES, n=1, cutoff=0.8))


def _check_declarations(owner: str, attrs: Mapping[str, object]) -> None:
    """Raise `TypeError` for an unknown capability-like attribute (a typo), a capability
    that is not a bool, or a `name` that is not a non-empty string."""
    for attr, value in attrs.items():
        if attr == "name" and not (isinstance(value, str) and value):
            raise TypeError(f"{owner}.name must be a non-empty string, got {value!r}")
        if not _looks_like_capability(attr):
            continue
        if attr not in CAPABILITIES:
            close = difflib.get_close_matches(attr, CAPABILITIES, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(sorted(CAPABILITIES))
            raise TypeError(f"{owner}.{attr} is not a strategy capability ({hint}known: {known})")
        if not isinstance(value, bool):
            raise TypeError(f"{owner}.{attr} must be True or False, got {value!r}")


class PlainStrategy(BaseStrategy):
    """A user's object that has `pick` but does not inherit `BaseStrategy`.

    It routes through `wrapped.pick`. What the object itself says is kept, checked
    as a subclass's declarations are: its `name` (else its class name), the
    capabilities it sets (`uses_affinity_key = True`), and its own `explain` method.
    """

    def __init__(self, wrapped: Strategy) -> None:
        self.wrapped = wrapped
        """The object adapted."""
        owner = type(wrapped).__qualname__
        declared = {
            attr: getattr(wrapped, attr) for attr in dir(wrapped) if _looks_like_capability(attr)
        }
        declared["name"] = str(getattr(wrapped, "name", type(wrapped).__name__))
        _check_declarations(owner, declared)
        # Per object, not per class: these shadow the class defaults for this instance.
        vars(self).update(declared)
        explain = getattr(wrapped, "explain", None)
        self._explain: Callable[..., Iterable[Candidate]] | None = (
            explain if callable(explain) else None
        )

    def pick(self, nodes: Sequence[NodeState], request: RequestInfo) -> NodeState | None:
        return self.wrapped.pick(nodes, request)

    def explain(self, nodes: Sequence[NodeState], request: RequestInfo) -> list[Candidate]:
        if self._explain is None:
            return super().explain(nodes, request)
        return list(self._explain(nodes, request))

    def __repr__(self) -> str:
        return f"PlainStrategy({self.wrapped!r})"


def as_base_strategy(strategy: Strategy) -> BaseStrategy:
    """`strategy` itself when it inherits `BaseStrategy`, else a `PlainStrategy` over it.

    Raises `TypeError` when the object declares a capability that does not exist.
    """
    if isinstance(strategy, BaseStrategy):
        return strategy
    return PlainStrategy(strategy)


def explain_pick(
    strategy: Strategy, nodes: Sequence[NodeState], request: RequestInfo, note: str = ""
) -> Decision:
    """What `strategy` would pick among `nodes`, with each candidate as its `explain`
    gives it (by default no score, the in-flight counts).

    The pick is real: a rotating strategy's cursor moves, as it would for a request.
    """
    declared = as_base_strategy(strategy)
    chosen = declared.pick(nodes, request) if nodes else None
    candidates = tuple(declared.explain(nodes, request)) if nodes else ()
    how = declared.explain_note(nodes, request) if nodes else ""
    note = "; ".join(part for part in (note, how) if part)
    return Decision(declared.name, chosen.url if chosen is not None else None, candidates, note)


def uses_node_load(strategy: object) -> bool:
    """Whether `strategy` declares `uses_node_load` (kept for older callers: read
    `as_base_strategy(strategy).uses_node_load`). False for an object without `pick`."""
    return isinstance(strategy, Strategy) and as_base_strategy(strategy).uses_node_load


def wants_affinity_key(strategy: object) -> bool:
    """Whether `strategy` declares `uses_affinity_key` (kept for older callers: read
    `as_base_strategy(strategy).uses_affinity_key`). False for an object without `pick`."""
    return isinstance(strategy, Strategy) and as_base_strategy(strategy).uses_affinity_key
