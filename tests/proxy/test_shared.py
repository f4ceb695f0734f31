"""The peers' counts of requests in flight (lmfleet/proxy/shared.py `PeerCounts`): what
each node's `peers` becomes as messages arrive, are partial, or stop; the hub's
sums of its workers' counts (`HeldTotals`): what each worker is told; and a node's
report as one worker passes it to the others (`shared_load`, `take_load`). The
processes that send them are tested over the hub and the store
(tests/cli/test_serve_workers.py, tests/proxy/test_store.py)."""

from __future__ import annotations

import json

import anyio
import pytest

from lmfleet.node.load import parse_metrics
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.proxy.shared import (
    HELD_FOR,
    HeldNews,
    HeldTotals,
    PeerCounts,
    encode,
    link_lost,
    shared_load,
    take_load,
)

A, B = "http://a", "http://b"


def test_changes_add_up_over_peers_and_report_only_what_changed() -> None:
    counts = PeerCounts()
    assert counts.heard("p", {A: 2, B: 1}, whole=True, now=0.0) == {A: 2, B: 1}
    assert counts.heard("q", {A: 3}, whole=False, now=0.0) == {A: 5}
    assert counts.heard("p", {B: 1}, whole=False, now=0.1) == {}  # no change, nothing to do
    assert counts.heard("p", {A: 0}, whole=False, now=0.2) == {A: 3}  # B stays as it was


def test_a_whole_message_drops_the_nodes_it_leaves_out() -> None:
    counts = PeerCounts()
    counts.heard("p", {A: 2, B: 4}, whole=True, now=0.0)
    assert counts.heard("p", {A: 2}, whole=True, now=1.0) == {B: 0}  # B removed there


def test_a_silent_peer_counts_for_nothing_and_a_lost_link_forgets_all() -> None:
    counts = PeerCounts()
    counts.heard("p", {A: 2}, whole=True, now=0.0)
    counts.heard("q", {A: 1, B: 1}, whole=True, now=HELD_FOR)
    assert counts.expire(HELD_FOR) == {}
    assert counts.expire(HELD_FOR + 0.5) == {A: 1}  # p: not heard for longer than HELD_FOR
    assert counts.clear() == {A: 0, B: 0}
    assert counts.heard("q", {A: 1}, whole=False, now=10.0) == {A: 1}


def test_each_worker_is_told_the_others_sums_and_only_what_changed_for_it() -> None:
    totals = HeldTotals()
    told_w1: dict[str, int] = {}
    told_w2: dict[str, int] = {}
    totals.heard("w1", {A: 2, B: 1}, whole=True)
    totals.heard("w2", {A: 3}, whole=True)
    # A worker's first message is whole: every node the others hold requests on.
    assert totals.others("w1", told_w1, None) == {A: 3}
    assert totals.others("w2", told_w2, None) == {A: 2, B: 1}
    totals.take_changed()
    totals.heard("w1", {A: 4}, whole=False)  # w1's own change: news for w2 only
    changed = totals.take_changed()
    assert totals.others("w1", told_w1, changed) is None
    assert totals.others("w2", told_w2, changed) == {A: 4}
    totals.heard("w1", {B: 1}, whole=False)  # unchanged: nothing for anyone
    assert totals.take_changed() == set()


def test_a_worker_that_leaves_counts_for_nothing_and_a_whole_message_drops_the_rest() -> None:
    totals = HeldTotals()
    told: dict[str, int] = {}
    totals.heard("w1", {A: 2, B: 5}, whole=True)
    totals.heard("w2", {A: 1}, whole=True)
    assert totals.others("w2", told, None) == {A: 2, B: 5}
    totals.heard("w1", {A: 2}, whole=True)  # B left out of a whole message: none there
    assert totals.others("w2", told, totals.take_changed()) == {B: 0}
    totals.left("w1")
    assert totals.others("w2", told, totals.take_changed()) == {A: 0}
    assert totals.others("w2", told, None) == {}  # w2's own requests are not news to it
    assert totals.others(None, {}, None) == {A: 1}  # a worker that shared nothing yet


def test_the_other_replicas_sums_reach_every_worker_but_not_the_replicas_own_total() -> None:
    totals = HeldTotals()
    told: dict[str, int] = {}
    totals.heard("w1", {A: 1}, whole=True)
    totals.heard("w2", {A: 2}, whole=True)
    totals.outside({A: 5, B: 1})  # what the other replicas hold, as the store said
    assert totals.others("w1", told, None) == {A: 7, B: 1}
    assert totals.totals == {A: 3}  # what this replica publishes: its own workers' only
    totals.take_changed()
    totals.outside({B: 0})  # gone there
    assert totals.others("w1", told, totals.take_changed()) == {B: 0}


def test_a_process_tells_what_changed_and_all_of_it_every_second() -> None:
    news = HeldNews()
    first = news.tell("p", {A: 1, B: 0}, now=10.0)
    assert first == {"op": "held", "by": "p", "counts": {A: 1, B: 0}, "whole": True}
    assert news.tell("p", {A: 1, B: 0}, now=10.1) is None  # nothing new
    assert news.tell("p", {A: 2}, now=10.2) == {  # B no longer counted: 0
        "op": "held",
        "by": "p",
        "counts": {A: 2, B: 0},
        "whole": False,
    }
    assert news.tell("p", {}, now=11.0) == {"op": "held", "by": "p", "counts": {}, "whole": True}


REPORT = b"""lmdeploy:num_requests_running{engine="0"} 6
lmdeploy:num_requests_waiting{engine="0"} 3
lmdeploy:gpu_cache_usage_perc{engine="0"} 0.5
lmdeploy:generation_tokens_total{engine="0"} 900
"""


def test_a_report_passed_on_reads_the_same_to_the_worker_that_hears_it() -> None:
    # The reader had 2 requests on the node, its peers 3: the report's rest (9 - 5) is
    # other clients'; the worker that hears it holds 1 of the 5 itself now.
    read = parse_metrics(REPORT, read_at=100.0, local_inflight=2, peer_inflight=3, fresh_for=1.0)
    assert read is not None
    wire = json.loads(encode(shared_load(read)))  # as it travels through the hub
    here = NodeState(url=A, status=NodeStatus.HEALTHY, inflight=1, peers=4)
    heard = take_load(wire, wire["at"], here)
    assert heard.load is not None
    assert heard.load.others(100.5) == read.others(100.5) == 4.0
    assert heard.held(100.5) == 1 + 4 + 4.0  # ours, the peers', the other clients'
    assert (heard.load.outstanding, heard.load.cache_usage) == (9.0, 0.5)
    assert heard.capacity == 6.0  # a queue behind a full batch: its size
    assert heard.load.others(103.0) == read.others(103.0) < 4.0  # it fades alike


def test_a_report_heard_is_taken_only_when_newer_and_the_node_healthy_here() -> None:
    old = parse_metrics(REPORT, read_at=100.0)
    new = parse_metrics(REPORT.replace(b"900", b"1000"), read_at=101.0)
    assert old is not None and new is not None
    wire = shared_load(old)
    mine = NodeState(url=A, status=NodeStatus.HEALTHY, load=new)
    assert take_load(wire, old.read_at, mine) is mine  # ours is newer
    asleep = NodeState(url=A, status=NodeStatus.SLEEPING)
    assert take_load(wire, old.read_at, asleep) is asleep
    # The pace is this worker's, from its previous report: 100 tokens in 1 s of 6 running.
    paced = take_load(shared_load(new), new.read_at, NodeState(A, NodeStatus.HEALTHY, load=old))
    assert paced.load is not None and paced.load.generation_tokens == 1000.0
    assert paced.load.busy_seconds == 6.0 and paced.load.paced_tokens == 100.0


def test_a_task_groups_error_of_a_lost_link_ends_the_link_and_any_other_is_raised() -> None:
    """anyio's task groups raise even one error as a group: a loss caught by its type
    alone would end the proxy instead of the link (a store's non-JSON message did)."""

    async def fail(exc: Exception) -> None:
        raise exc

    async def run_group(exc: Exception) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(fail, exc)

    def group_of(exc: Exception) -> BaseException:
        with pytest.raises(BaseException) as raised:
            anyio.run(run_group, exc)
        return raised.value

    gone = anyio.BrokenResourceError("the store went away")
    grouped = group_of(gone)
    assert not isinstance(grouped, anyio.BrokenResourceError)  # a group, not the error
    assert link_lost(grouped) is gone
    assert link_lost(ValueError("not JSON")) is not None
    assert link_lost(group_of(RuntimeError("a bug"))) is None
