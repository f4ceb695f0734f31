from __future__ import annotations

import random

import pytest

from lmfleet.errors import ConfigError, UnknownNodeError
from lmfleet.node.outliers import Outcome
from lmfleet.node.state import NodeRole, NodeStatus
from lmfleet.registry import NodeRegistry, normalize_url
from lmfleet.routing import resolve_strategy
from lmfleet.routing.base import Candidate, RequestInfo


def healthy(registry: NodeRegistry, url: str, models: tuple[str, ...] = ("m",)) -> None:
    registry.add(url, models=models)
    registry.modify(url, lambda s: s.evolve(status=NodeStatus.HEALTHY))


def test_normalize_url() -> None:
    assert normalize_url("127.0.0.1:23333/") == "http://127.0.0.1:23333"
    assert normalize_url(" https://gpu1:8000 ") == "https://gpu1:8000"
    assert normalize_url("http://gpu1:8000/v1/") == "http://gpu1:8000"
    bad_urls = ("ftp://x:1", "http://", "http://h:notaport", "file:///etc/passwd", "http://h:1/x")
    for bad in bad_urls:
        with pytest.raises(ConfigError):
            normalize_url(bad)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("not a url", "the host 'not a url' may hold only"),
        ("notaurl::", "invalid port: give a number from 1 to 65535"),
        ("http://h:0", "invalid port: give a number from 1 to 65535"),
        ("http://h:70000", "invalid port: give a number from 1 to 65535"),
        ("http://h:", "invalid port: give a number from 1 to 65535"),
        ("http://:80", "no host"),
        ("http://gpu*1:80", "may hold only letters"),
        ("http://[nope]:80", "'nope'"),
        ("ftp://h:1", "scheme must be http or https"),
        ("http://h:1/x", "path or query"),
    ],
)
def test_malformed_node_urls_are_rejected_with_the_expected_form(bad: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        normalize_url(bad)
    message = str(caught.value)
    assert repr(bad) in message and why in message
    assert "expected http(s)://host[:port], e.g. http://127.0.0.1:23333" in message


def test_host_names_and_ipv6_literals_are_accepted() -> None:
    assert normalize_url("gpu_1.rack-2.local:23333") == "http://gpu_1.rack-2.local:23333"
    assert normalize_url("http://[::1]:23333/v1") == "http://[::1]:23333"
    assert normalize_url("https://[fe80::1%25eth0]:8000") == "https://[fe80::1%25eth0]:8000"
    assert normalize_url("http://h") == "http://h"  # the scheme's default port
    with pytest.raises(ConfigError, match="must be a string"):
        normalize_url(23333)  # type: ignore[arg-type]


def test_lease_counts_inflight_and_release_records_latency() -> None:
    registry = NodeRegistry()
    healthy(registry, "http://a:1")
    strategy = resolve_strategy("least_connections")
    first = registry.lease(strategy, RequestInfo())
    assert first is not None and first.inflight == 1
    registry.release(first.url, Outcome.SUCCESS, latency=0.5, ttft=0.1)
    registry.release(first.url, Outcome.FAILURE)  # an extra release never goes below zero
    state = registry.get("http://a:1/")
    assert (state.inflight, state.served, state.errors) == (0, 1, 1)
    assert state.latency == 0.5 and state.ttft == 0.1
    registry.release(first.url, Outcome.SUCCESS, latency=1.5)
    assert registry.get("http://a:1").latency == pytest.approx(0.5 + 0.2 * (1.5 - 0.5))


def test_only_healthy_nodes_serving_the_model_are_eligible() -> None:
    registry = NodeRegistry()
    healthy(registry, "http://a:1", ("m1",))
    healthy(registry, "http://b:1", ("m2",))
    registry.add("http://c:1", models=("m1",))  # starting
    strategy = resolve_strategy("round_robin")
    picks = {registry.lease(strategy, RequestInfo(model="m1")).url for _ in range(6)}  # type: ignore[union-attr]
    assert picks == {"http://a:1"}
    assert registry.lease(strategy, RequestInfo(model="other")) is None
    assert registry.models() == ["m1", "m2"]


def test_avoid_is_a_preference_not_a_ban() -> None:
    registry = NodeRegistry()
    healthy(registry, "http://a:1")
    healthy(registry, "http://b:1")
    strategy = resolve_strategy("least_connections")
    got = registry.lease(strategy, RequestInfo(), avoid=["http://a:1"])
    assert got is not None and got.url == "http://b:1"
    only = registry.lease(strategy, RequestInfo(), avoid=["http://a:1", "http://b:1"])
    assert only is not None


def test_mark_failed_opens_the_circuit_only_for_healthy_nodes() -> None:
    registry = NodeRegistry()
    healthy(registry, "http://a:1")
    registry.mark_failed("http://a:1", "connect refused")
    state = registry.get("http://a:1")
    assert state.status is NodeStatus.UNHEALTHY and state.message == "connect refused"
    registry.modify("http://a:1", lambda s: s.evolve(status=NodeStatus.SLEEPING))
    registry.mark_failed("http://a:1", "503")
    assert registry.get("http://a:1").status is NodeStatus.SLEEPING


def test_remove_and_unknown_nodes() -> None:
    registry = NodeRegistry()
    healthy(registry, "http://a:1")
    registry.lease(resolve_strategy("round_robin"), RequestInfo())
    registry.release("http://a:1", Outcome.SUCCESS, latency=0.1, tokens=5)
    assert registry.traffic("http://a:1") == ([0.1], 5)
    assert registry.remove("http://a:1").status is NodeStatus.STOPPED
    assert registry.models() == []
    with pytest.raises(UnknownNodeError):
        registry.get("http://a:1")
    with pytest.raises(UnknownNodeError):
        registry.remove("http://a:1")
    assert registry.modify("http://a:1", lambda s: s) is None
    # Nothing of it is kept (a proxy whose nodes come and go under new URLs keeps
    # no row per node it ever saw); added again, it starts afresh.
    healthy(registry, "http://a:1")
    assert registry.traffic("http://a:1") == ([], 0)


def test_re_adding_keeps_counters_and_restarts_checks() -> None:
    registry = NodeRegistry()
    healthy(registry, "http://a:1")
    registry.release("http://a:1", Outcome.SUCCESS, latency=0.1)
    registry.modify("http://a:1", lambda s: s.evolve(status=NodeStatus.STOPPED))
    state = registry.add("http://a:1", api_key="sk-node-key")
    assert state.status is NodeStatus.STARTING and state.served == 1
    assert state.api_key == "sk-node-key"
    assert "sk-node-key" not in repr(state)


def test_re_adding_a_healthy_or_sleeping_node_keeps_what_it_said() -> None:
    """A proxy's state file re-adds the nodes its flags added: a sleeping node must not
    flap through `starting` (out of wake-on-demand's reach) until its next probe."""
    registry = NodeRegistry()
    healthy(registry, "http://a:1")
    registry.modify("http://a:1", lambda s: s.evolve(status=NodeStatus.SLEEPING))
    assert registry.add("http://a:1", origin="reloaded").status is NodeStatus.SLEEPING
    registry.modify("http://a:1", lambda s: s.evolve(status=NodeStatus.HEALTHY))
    assert registry.add("http://a:1").status is NodeStatus.HEALTHY
    for gone in (NodeStatus.UNHEALTHY, NodeStatus.EJECTED, NodeStatus.DRAINING):
        registry.modify("http://a:1", lambda s, gone=gone: s.evolve(status=gone))
        assert registry.add("http://a:1").status is NodeStatus.STARTING, gone


def test_hopeless_names_what_no_node_could_ever_give() -> None:
    registry = NodeRegistry()
    assert registry.hopeless(RequestInfo(weight_version=7)) is None  # nodes may register
    registry.add("http://a:1", models=("m",))
    registry.add("http://b:1", role=NodeRole.PREFILL)  # models not known yet
    assert registry.hopeless(RequestInfo(model="m")) is None
    assert registry.hopeless(RequestInfo(role=NodeRole.DECODE)) == "no node has the decode role"
    registry.modify("http://b:1", lambda s: s.evolve(models=("p",)))
    assert registry.hopeless(RequestInfo(model="x")) == "no node serves 'x'"
    assert registry.hopeless(RequestInfo(weight_version=0)) is None
    assert "weight version 1 (they are at 0)" in str(
        registry.hopeless(RequestInfo(weight_version=1))
    )
    registry.bring(1)
    assert registry.hopeless(RequestInfo(weight_version=1)) is None
    assert registry.hopeless(RequestInfo(min_weight_version=1)) is None
    registry.brought(1)
    assert "or later" in str(registry.hopeless(RequestInfo(min_weight_version=1)))


def test_max_staleness_counts_from_the_newest_node() -> None:
    registry = NodeRegistry()
    for url, version in (("http://a:1", 5), ("http://b:1", 4), ("http://c:1", 2)):
        registry.add(url, weight_version=version)
        registry.modify(url, lambda s: s.evolve(status=NodeStatus.HEALTHY))

    def eligible(request: RequestInfo) -> list[str]:
        decision = registry.explain(resolve_strategy("round_robin"), request)
        return sorted(c.url for c in decision.candidates)

    eligible_by_k = {k: eligible(RequestInfo(max_staleness=k)) for k in (0, 1, 3)}
    assert eligible_by_k == {
        0: ["http://a:1"],
        1: ["http://a:1", "http://b:1"],
        3: ["http://a:1", "http://b:1", "http://c:1"],
    }
    # A floor and a staleness together: the stricter one holds.
    both = eligible(RequestInfo(max_staleness=3, min_weight_version=4))
    assert both == ["http://a:1", "http://b:1"]
    # A stopped node's version is not the fleet's newest.
    registry.modify("http://a:1", lambda s: s.evolve(status=NodeStatus.STOPPED))
    assert eligible(RequestInfo(max_staleness=0)) == ["http://b:1"]


def test_the_doorbell_rings_when_a_node_opens_to_requests_and_only_then() -> None:
    registry = NodeRegistry()
    bell = registry.doorbell
    registry.add("http://a:1", models=("m",))  # starting: takes nothing yet
    assert bell.rings == 0
    healthy(registry, "http://a:1")
    assert bell.rings == 1  # became healthy
    registry.modify("http://a:1", lambda s: s.evolve(message="still fine"))
    registry.lease(resolve_strategy("round_robin"), RequestInfo())
    registry.release("http://a:1", Outcome.SUCCESS)
    assert bell.rings == 1  # nothing new to take
    registry.modify("http://a:1", lambda s: s.evolve(weight_version=1))
    assert bell.rings == 2  # a version a waiting request may ask for
    registry.modify("http://a:1", lambda s: s.evolve(status=NodeStatus.SLEEPING))
    assert bell.rings == 2
    registry.modify("http://a:1", lambda s: s.evolve(status=NodeStatus.HEALTHY))
    assert bell.rings == 3  # woken


class _Seen:
    """A strategy that explains each candidate as (URL, its requests in flight)."""

    def pick(self, nodes, request):  # type: ignore[no-untyped-def]
        return nodes[0]

    def explain(self, nodes, request):  # type: ignore[no-untyped-def]
        return [Candidate(n.url, float(n.inflight), "") for n in nodes]


def _eligible_by_hand(registry: NodeRegistry, request: RequestInfo) -> list[tuple[str, float]]:
    """The rule, from the snapshot: an exact version ask wins over every floor."""
    asks = (request.min_weight_version, registry.version_floor, -1)
    floor = max(v for v in asks if v is not None)
    return [
        (s.url, float(s.inflight))
        for s in registry.snapshot()
        if s.status is NodeStatus.HEALTHY
        and (request.model is None or request.model in s.models)
        and (
            s.weight_version >= floor
            if request.weight_version is None
            else s.weight_version == request.weight_version
        )
    ]


STATUSES = [*[NodeStatus.HEALTHY] * 3, NodeStatus.UNHEALTHY, NodeStatus.SLEEPING]


def test_eligible_nodes_kept_between_requests_follow_every_change() -> None:
    """The registry keeps each request shape's eligible nodes between leases (a pick
    over many nodes must not filter all of them per request): after any sequence of
    adds, removals, status, model and version changes, leases, releases and floors,
    what a request may go to is what the snapshot says, with current counts."""
    rng = random.Random(5)
    registry = NodeRegistry()
    strategy = resolve_strategy("least_load")
    seen = _Seen()
    shapes = [
        RequestInfo(model=m, weight_version=v, min_weight_version=f)
        for m in ("a", "b", None)
        for v in (None, 1)
        for f in (None, 2)
    ]
    urls = [f"http://n{i}:1" for i in range(12)]
    leased: list[str] = []
    for step in range(2000):
        present = [s.url for s in registry.snapshot()]
        action = rng.randrange(9)
        url = rng.choice(urls)
        if action == 0 or not present:
            registry.add(url, models=rng.choice([("a",), ("b",), ("a", "b")]))
        elif action == 1 and len(present) > 3:
            registry.remove(rng.choice(present))
        elif action == 2:
            status = rng.choice(STATUSES)
            registry.modify(rng.choice(present), lambda s, t=status: s.evolve(status=t))
        elif action == 3:
            models = rng.choice([("a",), ("b",), ("a", "b")])
            registry.modify(rng.choice(present), lambda s, m=models: s.evolve(models=m))
        elif action == 4:
            version = rng.randrange(4)
            registry.modify(rng.choice(present), lambda s, v=version: s.evolve(weight_version=v))
        elif action == 5:
            registry.version_floor = rng.choice([None, None, 1, 3])
        elif action in (6, 7):
            node = registry.lease(strategy, rng.choice(shapes))
            if node is not None:
                leased.append(node.url)
        elif leased:
            registry.release(leased.pop(rng.randrange(len(leased))), Outcome.SUCCESS, latency=0.1)
        for request in shapes:
            got = [(c.url, c.score) for c in registry.candidates(seen, request)]
            assert got == _eligible_by_hand(registry, request), (step, action, request)


def test_a_tier_s_size_leaves_out_its_stopped_and_draining_nodes() -> None:
    """Two healthy preferred nodes beside five stopped or draining ones keep every
    request (2 of 2 healthy); counted, 2 of 7 would send 60 % down a tier."""
    registry = NodeRegistry()
    for i in range(8):
        url = f"http://n{i}:1"
        registry.add(url, models=("m",), priority=0 if i == 7 else 1)
        status = NodeStatus.HEALTHY if i in (0, 1, 7) else NodeStatus.STOPPED
        status = NodeStatus.DRAINING if i in (5, 6) else status
        registry.modify(url, lambda s, st=status: s.evolve(status=st, latency=1.0))
    strategy = resolve_strategy("least_load")
    request = RequestInfo(model="m")
    picked = []
    for _ in range(200):
        node = registry.lease(strategy, request)
        assert node is not None
        picked.append(node.url)
        registry.release(node.url, Outcome.SUCCESS)
    assert "http://n7:1" not in picked and set(picked) == {"http://n0:1", "http://n1:1"}
