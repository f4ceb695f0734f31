"""LeastLoad: expected seconds on each node, every client's requests counted once."""

from __future__ import annotations

import math
import random
import threading

import httpx2
import pytest
from support import StartSim, chat, wait_until

from lmfleet import LMFleet
from lmfleet.errors import ConfigError
from lmfleet.node.load import NodeLoad
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.routing import LeastLoad, RequestInfo, resolve_strategy
from lmfleet.routing.base import explain_pick
from lmfleet.routing.least_load import (
    QUEUE_EXTRA,
    SAMPLE,
    SAMPLE_ABOVE,
    beyond_batch,
    expected_waits,
)
from lmfleet.sim.options import DEFAULT_MODEL

NOW = 100.0


def node(
    name: str,
    inflight: int = 0,
    *,
    latency: float | None = None,
    queue: float | None = None,
    ours_then: int = 0,
    age: float = 0.0,
    speed: float | None = None,
) -> NodeState:
    load = (
        None
        if queue is None
        else NodeLoad(
            running=queue, waiting=0, read_at=NOW - age, local_inflight=ours_then, fresh_for=1.0
        )
    )
    return NodeState(
        url=f"http://{name}:1",
        status=NodeStatus.HEALTHY,
        inflight=inflight,
        latency=latency,
        load=load,
        speed=speed,
    )


def strategy() -> LeastLoad:
    return LeastLoad(clock=lambda: NOW)


def test_resolves_by_name() -> None:
    assert isinstance(resolve_strategy("least_load"), LeastLoad)
    assert isinstance(resolve_strategy("Least-Load"), LeastLoad)


def test_without_reports_or_speeds_it_is_least_connections() -> None:
    nodes = [node("a", 3), node("b", 1), node("c", 2)]
    assert strategy().pick(nodes, RequestInfo()) == nodes[1]


def test_other_clients_requests_count() -> None:
    nodes = [node("a", queue=9), node("b", queue=2)]  # none of them ours
    assert strategy().pick(nodes, RequestInfo()) == nodes[1]


def test_own_requests_are_not_counted_twice() -> None:
    # Node a's report of 4 was our own 4: it holds 4, not 8; b holds 5 (ours 1, others 4).
    a = node("a", 4, queue=4, ours_then=4)
    b = node("b", 1, queue=4, ours_then=0)
    assert strategy().pick([a, b], RequestInfo()) == a


def test_a_slow_node_counts_its_queue_in_seconds() -> None:
    """Three requests on a 3x slower node weigh more than six on a fast one."""
    fast = node("fast", 6, latency=0.1)  # (6 + 1) x 0.1 = 0.7 s
    slow = node("slow", 3, latency=0.3)  # (3 + 1) x 0.3 = 1.2 s
    assert strategy().pick([fast, slow], RequestInfo()) == fast
    idle_slow = node("slow", 0, latency=0.3)  # 0.3 s: now the slow node wins
    assert strategy().pick([fast, idle_slow], RequestInfo()) == idle_slow


def test_requests_beyond_the_batch_weigh_more() -> None:
    """A request that would wait for a batch slot counts 1.75: it waits and holds up the rest."""
    # a: 10 held, batch of 8: 11 + 0.75 x 3 = 13.25; b: 11 held, capacity not learned: 12
    a = node("a", 10).evolve(capacity=8.0)
    b = node("b", 11)
    assert strategy().pick([a, b], RequestInfo()) == b
    assert "3 beyond its batch of 8, each x1.75" in strategy().explain([a, b], RequestInfo())[0].why
    # room in the batch: (held + 1) as before, 7 + 1 = 8 against 6 + 1 = 7
    roomy = node("a", 7).evolve(capacity=8.0)
    assert strategy().pick([roomy, node("b", 6)], RequestInfo()).url == b.url
    assert "beyond" not in strategy().explain([roomy], RequestInfo())[0].why


def test_an_unmeasured_node_gets_the_fastest_speed() -> None:
    """Optimistic prior: a new node is tried, not starved behind measured ones."""
    measured = node("a", 1, latency=0.2)  # 0.4 s
    new = node("b", 1)  # assumed 0.2 s/request too: a tie, rotated
    picks = {strategy_.pick([measured, new], RequestInfo()).url for strategy_ in [strategy()]}
    assert picks <= {measured.url, new.url}
    busy_new = node("b", 2)  # 0.6 s with the prior
    assert strategy().pick([measured, busy_new], RequestInfo()) == measured


def test_given_speeds_replace_the_latency_when_every_node_has_one() -> None:
    # 3 requests on a node twice as fast (4 / 2 = 2) beat 1 on a slow one (2 / 0.5 = 4),
    # whatever the latencies say
    nodes = [node("fast", 3, latency=9.0, speed=2.0), node("slow", 1, latency=0.1, speed=0.5)]
    assert strategy().pick(nodes, RequestInfo()) == nodes[0]
    reasons = [c.why for c in strategy().explain(nodes, RequestInfo())]
    assert "speed 2 (given)" in reasons[0]
    # one node without a speed: the latencies decide (9 s x 4 against 0.1 s x 2)
    nodes[0] = nodes[0].evolve(speed=None)
    assert strategy().pick(nodes, RequestInfo()) == nodes[1]


def test_stale_reports_fade() -> None:
    fresh = node("a", queue=6)  # 6 others, just read
    stale = node("b", queue=6, age=4.0)  # read 4 s ago, trusted for 1 s: 6 x 2^-3
    load = stale.load
    assert load is not None and abs(load.others(NOW) - 0.75) < 1e-9
    assert strategy().pick([fresh, stale], RequestInfo()) == stale


def test_the_one_pass_scores_are_the_named_rules() -> None:
    """`expected_waits` writes `NodeState.held` and `beyond_batch` out for speed (it
    runs per candidate per request): it must give what they give, or the pick and
    the registry's notion of a full node (`NodeState.held`) drift apart."""
    nodes = [
        node("a", 3, latency=0.5, queue=9, ours_then=2).evolve(capacity=8.0, peers=2),
        node("b", 1, latency=0.2, queue=4, age=3.5),  # a fading report
        node("c", 12, latency=0.3).evolve(capacity=4.0),  # no report, beyond its batch
        node("d", 0),  # nothing known: the fastest measured latency assumed
    ]
    for one, (score, held) in zip(nodes, expected_waits(nodes, NOW), strict=True):
        assert held == one.held(NOW)
        seconds = one.latency if one.latency is not None else 0.2
        assert score == (held + 1.0 + QUEUE_EXTRA * beyond_batch(one, held)) * seconds


def test_ties_rotate() -> None:
    nodes = [node("a"), node("b"), node("c")]
    chooser = strategy()
    assert [chooser.pick(nodes, RequestInfo()).url for _ in range(3)] == [n.url for n in nodes]


def test_explain_gives_each_score_and_its_parts() -> None:
    nodes = [node("a", 2, latency=0.1, queue=5, ours_then=2), node("b", 1)]
    explained = strategy().explain(nodes, RequestInfo())
    assert [c.url for c in explained] == [n.url for n in nodes]
    a, b = explained
    assert a.score is not None and abs(a.score - (5 + 1) * 0.1) < 1e-9
    assert "ours 2, others 3" in a.why and "0.1 s recent latency" in a.why
    assert b.score is not None and abs(b.score - 2 * 0.1) < 1e-9  # the fastest as prior
    assert "not measured yet" in b.why and "no /metrics report" in b.why


class _Counted(list[NodeState]):
    """Candidates that count how many of them a pick reads."""

    reads = 0

    def __getitem__(self, index):  # type: ignore[no-untyped-def,override]
        self.reads += 1
        return super().__getitem__(index)

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.reads += len(self)
        return super().__iter__()


def test_over_many_nodes_a_pick_ranks_a_random_sample() -> None:
    """Over `SAMPLE_ABOVE` candidates a pick reads `SAMPLE` of them (and the last
    pick's best two), not every one: the best of a random sample, so nearly always
    among the best few nodes but not always the very best (power of d choices)."""
    assert SAMPLE < SAMPLE_ABOVE
    count = 4 * SAMPLE_ABOVE
    nodes = _Counted(node(f"n{i:03d}", i) for i in range(count))  # node i holds i requests
    picks = []
    for seed in range(2000):  # a first pick each: no memory yet
        chooser = LeastLoad(clock=lambda: NOW, rng=random.Random(seed))
        picks.append(int(chooser.pick(nodes, RequestInfo()).url[8:11]))
    assert nodes.reads == 2000 * SAMPLE
    # The best of 32 draws out of 256 is past the middle with odds 2^-32.
    assert max(picks) < count // 2
    # The least loaded node is in the sample with odds 1 - (255/256)^32 = 11.8 %.
    assert 0.07 < picks.count(0) / len(picks) < 0.17
    assert len(set(picks)) > 10
    # At most SAMPLE_ABOVE candidates, or sampling off: every node is ranked.
    every = LeastLoad(clock=lambda: NOW, sample_above=math.inf)
    assert {every.pick(nodes, RequestInfo()).url for _ in range(50)} == {nodes[0].url}
    few = list(reversed(nodes[:SAMPLE_ABOVE]))
    assert {chooser.pick(few, RequestInfo()).url for _ in range(50)} == {nodes[0].url}


def test_a_sampled_pick_remembers_the_best_it_saw() -> None:
    """The last pick's best two are ranked again: a light node found once is not
    forgotten by the next draw (power of d choices with memory)."""
    count = 4 * SAMPLE_ABOVE
    nodes = _Counted(node(f"n{i:03d}", i) for i in range(count))
    chooser = LeastLoad(clock=lambda: NOW, rng=random.Random(3))
    picks = [int(chooser.pick(nodes, RequestInfo()).url[8:11]) for _ in range(200)]
    assert picks == sorted(picks, reverse=True)  # never worse than the one kept
    assert picks[-1] == 0
    assert nodes.reads == SAMPLE + 199 * (SAMPLE + 2)  # each sample, and the kept two
    # Fewer candidates than a kept position: it is left out, not an IndexError.
    backwards = list(reversed(nodes))
    last = [chooser.pick(backwards, RequestInfo()) for _ in range(200)][-1]
    assert last is backwards[-1]  # kept: positions 255 and another high one
    assert chooser.pick(backwards[: SAMPLE_ABOVE + 1], RequestInfo()) is not None


def test_a_sample_of_one_is_a_random_pick_and_nonsense_sizes_are_refused() -> None:
    nodes = [node(f"n{i:03d}", i) for i in range(8)]
    lone = LeastLoad(clock=lambda: NOW, rng=random.Random(1), sample_above=2, sample=1)
    assert len({lone.pick(nodes, RequestInfo()).url for _ in range(50)}) > 1
    for bad in ({"sample": 0}, {"sample_above": -1}, {"sample_above": math.nan}):
        with pytest.raises(ConfigError, match="least_load: sample"):
            LeastLoad(**bad)  # type: ignore[arg-type]


def test_explain_says_a_pick_over_many_nodes_is_sampled() -> None:
    nodes = [node(f"n{i:03d}", i % 5) for i in range(SAMPLE_ABOVE + 1)]
    decision = explain_pick(strategy(), nodes, RequestInfo(), "tier 0")
    assert decision.note == (
        f"tier 0; a pick ranks a random sample of {SAMPLE} of the {SAMPLE_ABOVE + 1} "
        "candidates (every one is scored here)"
    )
    assert len(decision.candidates) == SAMPLE_ABOVE + 1
    assert explain_pick(strategy(), nodes[:SAMPLE_ABOVE], RequestInfo()).note == ""


# -- live: real sims, another client's load, a node without /metrics ------------------

BUSY = ("--health-poll-interval", "0.2", "--ttft-ms", "2", "--tpot-ms", "100")


def _hold_streams(url: str, count: int, stop: threading.Event) -> list[threading.Thread]:
    """Another client: `count` long streams to `url`, read until `stop` (then dropped)."""

    def one() -> None:
        body = {
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "long"}],
            "max_tokens": 400,
            "stream": True,
        }
        with (
            httpx2.Client(timeout=60) as http,
            http.stream("POST", url + "/v1/chat/completions", json=body) as reply,
        ):
            for _ in reply.iter_bytes():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_another_clients_load_steers_least_load_and_a_node_without_metrics_still_serves(
    start_sim: StartSim,
) -> None:
    """Node a is busy with another client's 4 streams, which this fleet never sent; b
    reports an empty queue; c has no /metrics at all. least_load sends nothing to a,
    and still uses c (its load is what this fleet knows)."""
    a, b = start_sim(*BUSY), start_sim(*BUSY)
    c = start_sim(*BUSY, "--disable-metrics")
    stop = threading.Event()
    with LMFleet.attach([a.url, b.url, c.url], strategy="least_load", health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        threads = _hold_streams(a.url, 4, stop)
        try:
            queue = wait_until(
                lambda: {n.url: n.queue for n in fleet.nodes},
                what="the other client's load in a's snapshot",
                until=lambda q: (q[a.url] or 0) >= 4 and q[b.url] is not None,
            )
            assert queue[c.url] is None  # no /metrics: no report, no error
            assert {n.url: n.state for n in fleet.nodes}[c.url] is NodeStatus.HEALTHY

            decision = fleet.explain()
            assert decision.strategy == "least_load" and decision.chosen != a.url
            scores = {cand.url: cand for cand in decision.candidates}
            assert "others 4" in scores[a.url].why, scores[a.url]
            assert "no /metrics report" in scores[c.url].why

            client = fleet.client(max_retries=0)
            for i in range(6):
                chat(client, fleet.model, f"q{i}", max_tokens=1)
            served = {n.url: n.served for n in fleet.nodes}
            assert served[a.url] == 0, served
            assert served[b.url] > 0 and served[c.url] > 0, served
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=10)


def test_the_nodes_own_decode_pace_ranks_them_without_their_queues(
    start_sim: StartSim,
) -> None:
    """Two nodes busy with another client's streams, one 4x slower: the pace read
    from each node's counters (seconds per token per sequence) tells them apart,
    and least_load ranks by it."""
    timing = ("--health-poll-interval", "0.2", "--tpot-ms", "20", "--output-tokens", "100000")
    fast, slow = start_sim(*timing), start_sim(*timing, "--speed", "0.25")
    stop = threading.Event()
    urls = [fast.url, slow.url]
    with LMFleet.attach(urls, strategy="least_load", health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        threads = _hold_streams(fast.url, 2, stop) + _hold_streams(slow.url, 2, stop)
        try:

            def paces() -> dict[str, float | None]:
                loads = {url: fleet.registry.get(url).load for url in urls}
                return {url: None if load is None else load.pace for url, load in loads.items()}

            pace = wait_until(
                paces,
                what="a decode pace for both nodes",
                until=lambda p: None not in p.values(),
                timeout=30,
            )
            ratio = (pace[slow.url] or 0.0) / (pace[fast.url] or 1.0)
            assert 2.5 < ratio < 6.0, pace  # 4x slower, same batch on both
            decision = fleet.explain()
            assert decision.chosen == fast.url  # 2 + 1 requests either side: pace decides
            reasons = {c.url: c.why for c in decision.candidates}
            assert "s per token (its /metrics)" in reasons[slow.url], reasons
            shown = {n.url: n.pace for n in fleet.nodes}  # the snapshot shows it too
            assert shown[slow.url] is not None and shown[fast.url] is not None
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=10)


def test_the_proxy_explains_its_next_pick(start_sim: StartSim) -> None:
    node = start_sim(*BUSY)
    with LMFleet.attach([node.url], strategy="least_load", health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        server = fleet.serve(port=0)
        wait_until(lambda: fleet.nodes[0].queue is not None, what="a /metrics report")
        answer = httpx2.get(server.url + "/fleet/explain", params={"model": fleet.model})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["strategy"] == "least_load" and body["chosen"] == node.url
        (candidate,) = body["candidates"]
        assert candidate["url"] == node.url and candidate["score"] > 0
        assert "0 request(s) on the node" in candidate["why"]
        unknown = httpx2.get(server.url + "/fleet/explain", params={"model": "nope"}).json()
        assert unknown["chosen"] is None and "no node is eligible" in unknown["note"]
