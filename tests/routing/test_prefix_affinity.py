"""PrefixAffinity: consistent hashing on the affinity key, bounded by the expected wait."""

from __future__ import annotations

import math
import random
import time
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.affinity_mean import make_registry
from lmfleet.errors import ConfigError
from lmfleet.node.load import NodeLoad
from lmfleet.node.outliers import Outcome
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
from lmfleet.routing.prefix_affinity import NODES_PER_PICK


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
    keyed = explain_pick(affinity(), nodes, RequestInfo(affinity_key="s1")).note
    assert "sample" not in keyed and "a mean up to 12 picks or 50 ms old" in keyed
    few = nodes[:64]
    assert explain_pick(affinity(), few, RequestInfo(affinity_key="s1")).note == ""


@pytest.mark.parametrize("hot", [True, False], ids=["hot-keys", "many-keys"])
def test_a_keyed_pick_over_many_nodes_bounds_as_the_exact_mean_does(hot: bool) -> None:
    """Over more than 64 candidates the mean is kept for up to 16 picks (of 128 nodes),
    and only the nodes the walk visits are scored. Through a real registry (its kept list of
    eligible nodes, leases and releases, load rising and draining; hot keys, whose
    walks mostly score every node, or many, whose walks mostly keep the mean), the
    picks are the exact mean's nearly always, and a pick is within the bound of a
    mean that moved as far as the leases and releases since it was taken can move
    it (one request's cost, at most 2 s here, over the 128 nodes, each)."""
    rng = random.Random(3)
    count = 128
    registry = make_registry(count, rng)
    kept = PrefixAffinity(rng=random.Random(1))
    exact = PrefixAffinity(mean_every_above=math.inf)
    held: list[str] = []
    same = picks = 0
    for phase in range(6):
        draining = phase % 2 == 1
        for _ in range(400):
            session = int(rng.paretovariate(1.2)) if hot else rng.randrange(10_000)
            request = RequestInfo(model="m", affinity_key=f"s{session}")
            nodes = registry.snapshot()
            expected = exact.pick(nodes, request)
            waits = [wait for wait, _ in expected_waits(nodes, time.monotonic())]
            mean = math.fsum(waits) / len(waits)
            chosen = registry.lease(kept, request)
            assert chosen is not None and expected is not None
            picks += 1
            same += chosen.url == expected.url
            wait = waits[[n.url for n in nodes].index(chosen.url)]
            moved = 3 * 2.0 / NODES_PER_PICK  # a lease and up to two releases a pick
            assert wait <= exact.load_factor * (mean + moved) * (1 + 1e-9), (wait, mean)
            held.append(chosen.url)
            for _ in range(2 if draining else int(rng.random() < 0.2)):
                if held:
                    registry.release(held.pop(rng.randrange(len(held))), Outcome.SUCCESS)
    assert same >= 0.95 * picks, (same, picks)


def test_a_kept_index_follows_the_node_list_it_was_made_for() -> None:
    """The URL index is kept by the list's identity (the registry's kept list): another
    list, one more node, or a list changed under it, is indexed anew, never picked
    from stale (a node the index lacks would never be picked)."""
    strategy, exact = affinity(), affinity(mean_every_above=math.inf)
    first = [node(i) for i in range(100)]
    second = [node(100 + i) for i in range(100)]
    for i in range(50):
        for nodes in (first, second):
            assert pick(strategy, nodes, f"k{i}") in nodes
    grown = [*first, node(200)]  # its keys go to the new node (all are idle)
    newcomer = next(k for k in map(str, range(10_000)) if pick(exact, grown, k) == grown[-1])
    pick(strategy, first, newcomer)
    assert pick(strategy, grown, newcomer) == grown[-1]
    first[:] = [node(300 + i) for i in range(100)]  # the same list, other nodes
    for i in range(50):
        assert pick(strategy, first, f"k{i}") in first


def test_a_walk_over_a_stale_mean_takes_it_anew_and_picks_as_the_exact_mean() -> None:
    """Every node got busier than the kept bound since the mean was taken: the walk
    takes the mean anew and picks what the exact mean picks (it never walks the
    whole ring, nor falls back)."""
    strategy, exact = affinity(), affinity(mean_every_above=math.inf)
    nodes = [node(i, latency=1.0) for i in range(100)]
    pick(strategy, nodes, "warm")  # the mean of idle nodes, kept
    nodes[:] = [node(i, 10 + i % 7, latency=1.0) for i in range(100)]
    for key in (f"k{i}" for i in range(20)):
        assert pick(strategy, nodes, key) == pick(exact, nodes, key)


def test_a_negative_exact_mean_threshold_is_refused() -> None:
    with pytest.raises(ConfigError, match="mean_every_above"):
        PrefixAffinity(mean_every_above=-1)


def test_each_node_list_keeps_its_own_mean() -> None:
    """Requests of two models alternate over two kept lists: each list keeps its own
    mean (one list's picks do not make the other's mean be taken anew each time).
    Seen where the kept mean and the exact one disagree: every node of `first` was
    busy when its mean was taken, then all but the key's owner went idle in place;
    the kept bound still holds the owner, the exact one passes it by."""
    strategy, exact = affinity(), affinity(mean_every_above=math.inf)
    first = [node(i, 1, latency=1.0) for i in range(100)]
    second = [node(100 + i, latency=1.0) for i in range(100)]
    owner = pick(strategy, first, "key")
    pick(strategy, second, "other")
    first[:] = [node(i, 1 if n.url == owner.url else 0, latency=1.0) for i, n in enumerate(first)]
    assert pick(exact, first, "key") != owner
    assert pick(strategy, first, "key") == owner
