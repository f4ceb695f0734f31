"""The peers' counts of requests in flight (lmfleet/proxy/shared.py `PeerCounts`): what
each node's `peers` becomes as messages arrive, are partial, or stop; and the hub's
sums of its workers' counts (`HeldTotals`): what each worker is told. The processes
that send them are tested over the hub and the store (tests/cli/test_serve_workers.py,
tests/proxy/test_store.py)."""

from __future__ import annotations

from lmfleet.proxy.shared import HELD_FOR, HeldNews, HeldTotals, PeerCounts

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
