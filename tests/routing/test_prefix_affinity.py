"""PrefixAffinity: consistent hashing on the affinity key, bounded by the expected wait."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmfleet.errors import ConfigError
from lmfleet.node.load import NodeLoad
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.routing import (
    PrefixAffinity,
    RequestInfo,
    explain_pick,
    uses_node_load,
    wants_affinity_key,
)
from lmfleet.routing._ring import stable_hash
from lmfleet.routing.least_load import expected_waits


def node(
    i: int, inflight: int = 0, *, latency: float | None = None, others: float = 0.0
) -> NodeState:
    load = None if not others else NodeLoad(running=others, waiting=0, read_at=NOW, fresh_for=1.0)
    return NodeState(
        url=f"http://n{i:02d}:1",
        status=NodeStatus.HEALTHY,
        inflight=inflight,
        latency=latency,
        load=load,
    )


NOW = 50.0


def affinity(**kwargs: float) -> PrefixAffinity:
    return PrefixAffinity(clock=lambda: NOW, **kwargs)  # type: ignore[arg-type]


def pick(strategy: PrefixAffinity, nodes: list[NodeState], key: str | None) -> NodeState:
    chosen = strategy.pick(nodes, RequestInfo(affinity_key=key))
    assert chosen is not None
    return chosen


def test_declares_the_affinity_key() -> None:
    assert PrefixAffinity.name == "prefix_affinity"
    assert PrefixAffinity.uses_affinity_key is True
    assert uses_node_load(affinity())
    assert wants_affinity_key(affinity())


def test_stable_hash_is_process_independent() -> None:
    # BLAKE2b is standardised: a pinned value proves no per-process salt (unlike hash()).
    assert stable_hash("abc") == 0xD8BB14D833D59559
    assert stable_hash("abc") == stable_hash("abc") != stable_hash("abd")


def test_same_key_same_node_and_keys_spread() -> None:
    nodes = [node(i) for i in range(4)]
    strategy = affinity()
    first = {f"k{i}": pick(strategy, nodes, f"k{i}").url for i in range(400)}
    again = {f"k{i}": pick(affinity(), nodes, f"k{i}").url for i in range(400)}
    assert first == again  # deterministic across instances (and processes)
    counts = Counter(first.values())
    assert len(counts) == 4
    assert all(60 < c < 140 for c in counts.values())


def test_listing_order_does_not_matter() -> None:
    nodes = [node(i) for i in range(5)]
    strategy = affinity()
    for i in range(50):
        assert pick(strategy, nodes, f"k{i}") == pick(strategy, nodes[::-1], f"k{i}")


def test_no_key_falls_back_to_least_load() -> None:
    nodes = [node(0, 4), node(1, 1), node(2, 3)]
    assert pick(affinity(), nodes, None).url == "http://n01:1"
    # least_load, not least_connections: n01 is slow, n02 idle by all clients' count
    nodes = [node(0, 4), node(1, 1, latency=3.0), node(2, 2, latency=1.0)]
    assert pick(affinity(), nodes, None).url == "http://n02:1"


def test_overloaded_home_walks_to_the_next_node() -> None:
    nodes = [node(i) for i in range(4)]
    strategy = affinity()
    home = pick(strategy, nodes, "hot")
    # expected waits (requests + 1, no latency measured): 7, 1, 1, 1;
    # bound 1.25 x mean 2.5 = 3.1: home is over it.
    loaded = [n.evolve(inflight=6) if n.url == home.url else n for n in nodes]
    other = pick(strategy, loaded, "hot")
    assert other.url != home.url
    # The walk is deterministic: the same next node every time.
    assert pick(strategy, loaded, "hot") == other


def test_home_within_the_bound_keeps_the_key() -> None:
    nodes = [node(i, 2) for i in range(4)]
    strategy = affinity()
    home = pick(strategy, nodes, "warm")
    # every wait is 3, the bound 1.25 x 3: home may take one more.
    assert pick(strategy, nodes, "warm") == home


def test_excluded_home_moves_consistently() -> None:
    """Failover (`avoid`) removes the home node: its keys go to their next nodes only."""
    nodes = [node(i) for i in range(6)]
    strategy = affinity()
    keys = [f"k{i}" for i in range(300)]
    before = {k: pick(strategy, nodes, k).url for k in keys}
    gone = nodes[2].url
    after = {k: pick(strategy, [n for n in nodes if n.url != gone], k).url for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != gone)
    # and back: the full set maps exactly as before (one ring, no rebuild drift)
    assert {k: pick(strategy, nodes, k).url for k in keys} == before


def test_adding_a_node_moves_about_one_nth_of_keys() -> None:
    nodes = [node(i) for i in range(8)]
    keys = [f"session-{i}" for i in range(2000)]
    before = {k: pick(affinity(), nodes, k).url for k in keys}
    strategy = affinity()
    grown = [*nodes, node(8)]
    after = {k: pick(strategy, grown, k).url for k in keys}
    moved = [k for k in keys if after[k] != before[k]]
    assert all(after[k] == "http://n08:1" for k in moved)  # only to the new node
    assert 2000 / 9 * 0.6 < len(moved) < 2000 / 9 * 1.4


def test_stale_urls_are_pruned_without_changing_picks() -> None:
    strategy = affinity(vnodes=8)
    stable = [node(i) for i in range(3)]
    homes = {f"k{i}": pick(strategy, stable, f"k{i}").url for i in range(50)}
    for gen in range(10):  # nodes come and go
        pick(strategy, [*stable, node(10 + gen)], "x")
    assert len(strategy._ring.urls) < 3 + 10
    assert {f"k{i}": pick(strategy, stable, f"k{i}").url for i in range(50)} == homes


@pytest.mark.parametrize("kwargs", [{"load_factor": 0.9}, {"vnodes": 0}])
def test_bad_options(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        PrefixAffinity(**kwargs)  # type: ignore[arg-type]


@given(
    st.lists(st.integers(0, 12), min_size=1, max_size=12),
    st.lists(st.sampled_from([None, 0.5, 1.0, 3.0]), min_size=12, max_size=12),
    st.text(min_size=1, max_size=20),
    st.sampled_from([1.0, 1.25, 2.0]),
)
def test_bound_is_never_exceeded(
    loads: list[int], latencies: list[float | None], key: str, factor: float
) -> None:
    nodes = [node(i, load, latency=latencies[i]) for i, load in enumerate(loads)]
    chosen = pick(affinity(load_factor=factor, vnodes=16), nodes, key)
    waits = dict(
        zip(
            [n.url for n in nodes],
            [w for w, _ in expected_waits(nodes, NOW)],
            strict=True,
        )
    )
    assert chosen in nodes
    assert waits[chosen.url] <= factor * sum(waits.values()) / len(waits) * (1 + 1e-9)


def test_a_slow_home_yields_its_keys_sooner() -> None:
    """Same request counts; the home node is 3x slower: its keys move on."""
    nodes = [node(i, 2, latency=1.0) for i in range(3)]
    strategy = affinity()
    home = pick(strategy, nodes, "chat-7")
    slow = [n.evolve(latency=3.0) if n.url == home.url else n for n in nodes]
    # waits: 9 at home, 3 elsewhere; bound 1.25 x 5 = 6.25
    assert pick(strategy, slow, "chat-7").url != home.url


def test_other_clients_requests_count_toward_the_bound() -> None:
    nodes = [node(i) for i in range(3)]
    strategy = affinity()
    home = pick(strategy, nodes, "session-1")
    busy = [node(int(n.url[8:10]), others=6) if n.url == home.url else n for n in nodes]
    assert busy[[n.url for n in busy].index(home.url)].load is not None
    assert pick(strategy, busy, "session-1").url != home.url


def test_explain_names_the_walk_and_the_bound() -> None:
    nodes = [node(0, 6), node(1), node(2)]
    strategy = affinity()
    decision = explain_pick(strategy, nodes, RequestInfo(affinity_key="k"))
    assert decision.strategy == "prefix_affinity"
    assert {c.url for c in decision.candidates} == {n.url for n in nodes}
    ranks = sorted(c.why.split(" ")[0] for c in decision.candidates)
    assert ranks == ["#1", "#2", "#3"]
    by_url = {c.url: c for c in decision.candidates}
    assert "over the bound" in by_url["http://n00:1"].why
    assert by_url["http://n00:1"].score == 7.0
    assert decision.chosen != "http://n00:1"
    assert "within the bound" in by_url[decision.chosen or ""].why
    keyless = explain_pick(strategy, nodes, RequestInfo())
    assert all(c.why.startswith("no affinity key, least_load") for c in keyless.candidates)


def test_explain_says_when_a_keyless_pick_over_many_nodes_is_sampled() -> None:
    """Without a key the pick is least_load's, sampled over more than 64 candidates:
    `fleet.explain()` must say so, as least_load's own does; a keyed pick walks the
    ring over every node and says nothing of a sample."""
    nodes = [node(i, i % 5) for i in range(100)]
    keyless = explain_pick(affinity(), nodes, RequestInfo())
    assert "a pick ranks a random sample of 32 of the 100 candidates" in keyless.note
    assert explain_pick(affinity(), nodes, RequestInfo(affinity_key="s1")).note == ""
