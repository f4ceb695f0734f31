"""The peers' counts of requests in flight (lmfleet/proxy/shared.py `PeerCounts`): what
each node's `peers` becomes as messages arrive, are partial, or stop. The processes
that send them are tested over the hub and the store (tests/cli/test_serve_workers.py,
tests/proxy/test_store.py)."""

from __future__ import annotations

from lmfleet.proxy.shared import HELD_FOR, PeerCounts

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
