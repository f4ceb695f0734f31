"""The status table (`print(fleet)`): what each cell claims, and never an old value as now.

The HTML table and the dashboard draw the same cells (tests/notebook/test_dashboard.py).
"""

from __future__ import annotations

import re

from support import StartSim, chat, wait_until

from lmfleet import LMFleet
from lmfleet.config import FleetOptions, HealthOptions, OutlierOptions
from lmfleet.node.load import NodeLoad
from lmfleet.node.state import NodeState, NodeStatus
from lmfleet.node.views import (
    COLUMN_NAMES,
    TEXT_COLUMNS,
    FleetStatus,
    NodeSnapshot,
    queue_cell,
    recent_errors_cell,
)

FAST = ("--fast", "--health-poll-interval", "0")
BLACK_HOLE = ("--error-rate", "1", "--error-status", "500")


def cell(fleet: LMFleet, url: str, column: str) -> str:
    """One cell of `print(fleet)`'s table, by node and column name."""
    lines = repr(fleet).splitlines()
    header = lines[1]
    starts = [header.index(name) for name in TEXT_COLUMNS]
    index = TEXT_COLUMNS.index(column)
    for line in lines[2:]:
        if line.startswith(url + " "):
            end = starts[index + 1] if index + 1 < len(starts) else len(line)
            return line[starts[index] : end].strip()
    raise AssertionError(f"no row for {url} in:\n{fleet!r}")


def snapshot(now: float, *, inflight: int = 0, ours_then: int = 0) -> NodeSnapshot:
    """A node whose `/metrics` report (2 running, 1 waiting) was read at t=100."""
    load = NodeLoad(running=2, waiting=1, read_at=100.0, local_inflight=ours_then, fresh_for=2.0)
    state = NodeState("http://n:1", NodeStatus.HEALTHY, inflight=inflight, load=load)
    return NodeSnapshot.of(state, now=now)


def text_cell(node: NodeSnapshot, column: str) -> str:
    lines = FleetStatus(strategy="x", models=[], nodes=[node]).table().splitlines()
    cells = re.split(r"\s{2,}", lines[2].strip())
    return cells[TEXT_COLUMNS.index(column)]


def test_the_node_queue_is_shown_as_current_only_while_it_is() -> None:
    queue = COLUMN_NAMES["queue"]
    fresh = snapshot(now=101.0)
    assert (fresh.queue, fresh.queue_age, fresh.queue_current) == (3, 1.0, True)
    assert text_cell(fresh, queue) == "3"
    # Older than two monitor intervals: a read was missed; the count keeps its age.
    old = snapshot(now=112.0)
    assert not old.queue_current and text_cell(old, queue) == "3 (12s ago)"
    # Read while two requests of ours ran there; none is in flight now, so the count
    # includes requests that have ended, however young the report.
    ended = snapshot(now=100.5, ours_then=2)
    assert not ended.queue_current and text_cell(ended, queue) == "3 (0.5s ago)"
    assert snapshot(now=100.5, inflight=1, ours_then=2).queue_current
    assert queue_cell(None, None, False) == "-"  # no report at all


def test_recent_errors_say_what_they_are_over() -> None:
    """176 requests, 8 errors, and the one answer since the node came back failed:
    the old `error %` read 100 %; the cell now says 1 of the last 1."""
    state = NodeState(
        "http://n:1", NodeStatus.EJECTED, served=176, errors=8, error_rate=1.0, recent_answers=1
    )
    node = NodeSnapshot.of(state)
    assert node.recent_errors == 1
    assert text_cell(node, COLUMN_NAMES["recent_errors"]) == "1/1"
    assert text_cell(node, COLUMN_NAMES["served"]) == "176"
    assert recent_errors_cell(0.0, 0) == "-"  # no answer yet
    assert "error %" not in FleetStatus(strategy="x", models=[], nodes=[node]).table()


def test_print_fleet_shows_an_old_node_queue_with_its_age(start_sim: StartSim) -> None:
    """`/metrics` read once (a long metrics interval): after two probe rounds the
    queue column no longer passes that count as the node's queue now."""
    node = start_sim(*FAST)
    options = FleetOptions(health=HealthOptions(metrics_interval=3600))
    with LMFleet.attach([node.url], options=options, health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        wait_until(lambda: fleet.nodes[0].queue is not None, what="a /metrics report")
        shown = wait_until(
            lambda: cell(fleet, node.url, COLUMN_NAMES["queue"]),
            until=lambda text: "ago" in text,
        )
        assert re.fullmatch(r"0 \(\d+(\.\d)?s ago\)", shown), shown


def test_print_fleet_gives_recent_errors_over_their_window(start_sim: StartSim) -> None:
    """A failing node is ejected after 5 failures in a row (5/5); the good node's
    requests outnumber the window, which the cell names (0/20)."""
    good, hole = start_sim(*FAST), start_sim(*FAST, *BLACK_HOLE)
    window = OutlierOptions().window
    with LMFleet.attach([good.url, hole.url], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30, min_ready=2)
        client = fleet.client(max_retries=0)

        def send() -> dict[str, NodeSnapshot]:
            assert chat(client, fleet.model, "hi", max_tokens=2).choices  # failed over
            return {n.url: n for n in fleet.nodes}

        wait_until(
            send,
            until=lambda nodes: (
                nodes[hole.url].state is NodeStatus.EJECTED and nodes[good.url].served > window + 5
            ),
        )
        recent = COLUMN_NAMES["recent_errors"]
        assert cell(fleet, hole.url, recent) == "5/5"
        assert cell(fleet, good.url, recent) == f"0/{window}"
        assert int(cell(fleet, good.url, COLUMN_NAMES["served"])) > window
