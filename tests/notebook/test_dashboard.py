"""The dashboard widget and the HTML / text fallbacks over real simulated nodes."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from html import escape, unescape

import pytest
from support import SimNode, StartSim, chat, wait_until

from lmfleet import LMFleet
from lmfleet.config import OutlierOptions
from lmfleet.node.outliers import Outcome
from lmfleet.node.views import COLUMN_NAMES, METERED_COLUMNS, NOTEBOOK_COLUMNS, TEXT_COLUMNS
from lmfleet.notebook import display, html
from lmfleet.notebook.dashboard import Dashboard
from lmfleet.notebook.stats import TrafficMeter

FAST = ("--health-poll-interval", "0.5", "--ttft-ms", "5", "--tpot-ms", "2")
SECRET = "sk-node-secret-1234"


@pytest.fixture
def sims(start_sim: StartSim) -> list[SimNode]:
    return [start_sim(*FAST, "--output-tokens", "16", "--api-keys", SECRET) for _ in range(3)]


@pytest.fixture
def fleet(sims: list[SimNode]) -> Iterator[LMFleet]:
    with LMFleet.attach([s.url for s in sims], api_key=SECRET, health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30, min_ready=3)
        yield fleet


def stream_some(fleet: LMFleet, n: int) -> None:
    client = fleet.client()
    for i in range(n):
        for _ in chat(client, fleet.model, f"hi {i}", max_tokens=16, stream=True):
            pass


def test_widget_content_follows_traffic(fleet: LMFleet, sims: list[SimNode]) -> None:
    board = Dashboard(fleet)
    urls = [s.url for s in sims]
    assert list(board.rows) == urls
    first = board.rows[urls[0]].texts()
    assert "healthy" in first["state"] and first["requests"] == "0"
    assert first["p50 latency"] == "-" and first["tokens/s"] == "-"
    assert "3/3 healthy" in board.header.value

    stream_some(fleet, 12)
    fleet.chat_many([[{"role": "user", "content": "x"}]] * 9, progress=False, max_tokens=8)
    time.sleep(0.05)  # a measurable interval for the rate (not a timing assertion)
    view = board.refresh()
    texts = [board.rows[url].texts() for url in urls]
    assert sum(int(t["requests"]) for t in texts) == 21
    assert view.served == 21 and view.tokens_per_s is not None and view.tokens_per_s > 0
    assert all(t["p50 latency"].endswith(" ms") for t in texts)
    assert all(t["TTFT"].endswith(" ms") for t in texts)
    assert "21 requests" in board.header.value
    # Streamed chunks and batch usage both count as tokens.
    assert sum(r.tokens for r in view.rows) >= 12 * 16 + 9 * 8
    # Widget children: column heads, then one row of cells plus buttons per node.
    assert len(board.grid.children) == (len(html.COLUMNS) + 1) * 4
    recent = COLUMN_NAMES["recent_errors"]  # failed/answers of the last ones: 0/k here
    window = OutlierOptions().window
    answers = [min(int(t["requests"]), window) for t in texts]
    assert [t[recent] for t in texts] == [f"0/{k}" if k else "-" for k in answers]
    assert all(t["latency"].endswith(" ms") for t in texts)


def test_background_refresh_and_buttons(fleet: LMFleet, sims: list[SimNode]) -> None:
    board = Dashboard(fleet, interval=0.1)
    board.start()
    url = sims[0].url
    before = board.header.value
    stream_some(fleet, 3)
    wait_until(lambda: board.header.value != before and "3 requests" in board.header.value)

    row = board.rows[url]
    row.buttons["sleep"].click()  # returns at once; the command runs in the fleet's loop
    wait_until(lambda: "sleeping" in row.texts()["state"] and "done" in board.message.value)
    assert "sleep" in board.message.value
    row.buttons["wake"].click()
    wait_until(lambda: "healthy" in row.texts()["state"])
    row.buttons["drain"].click()
    wait_until(lambda: "stopped" in row.texts()["state"])

    board.widget.close()  # closing the widget ends its refresh task
    wait_until(lambda: not board.running)


def test_command_errors_show_in_the_widget(fleet: LMFleet, sims: list[SimNode]) -> None:
    board = Dashboard(fleet)
    sims[2].process.kill()
    sims[2].process.wait(timeout=5)
    board.rows[sims[2].url].buttons["sleep"].click()
    wait_until(lambda: "failed" in board.message.value)
    assert "color:#d62728" in board.message.value


def test_refresh_stops_when_the_fleet_closes(sims: list[SimNode]) -> None:
    fleet = LMFleet.attach([s.url for s in sims], api_key=SECRET, health_interval=0.2)
    board = Dashboard(fleet, interval=0.05)
    board.start()
    assert board.running
    fleet.close()
    wait_until(lambda: not board.running)
    board.refresh()
    assert "closed" in board.header.value


def test_html_and_text_fallbacks_never_show_keys(fleet: LMFleet, sims: list[SimNode]) -> None:
    stream_some(fleet, 3)
    page = fleet._repr_html_()
    assert "<table" in page and all(s.url in page for s in sims)
    assert "healthy" in page and "tokens/s" in page
    bundle = fleet._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"}  # no kernel here: no widget
    board = Dashboard(fleet)
    widget_text = board.header.value + "".join(
        cell.value for row in board.rows.values() for cell in row.cells
    )
    for text in (page, bundle["text/plain"], widget_text, repr(fleet.status())):
        assert SECRET not in text
    assert not display.in_kernel()


def test_tokens_per_second_window() -> None:
    from lmfleet.node.state import NodeStatus
    from lmfleet.node.views import FleetStatus, NodeSnapshot
    from lmfleet.registry import NodeRegistry

    registry = NodeRegistry()
    registry.add("http://127.0.0.1:1")
    registry.modify("http://127.0.0.1:1", lambda s: s.evolve(status=NodeStatus.HEALTHY))
    now = [100.0]
    meter = TrafficMeter(registry, window=5.0, clock=lambda: now[0])

    def status() -> FleetStatus:
        return FleetStatus(
            strategy="x", models=[], nodes=[NodeSnapshot.of(s) for s in registry.snapshot()]
        )

    assert meter.view(status()).tokens_per_s is None  # one sample: no rate yet
    for latency in (0.1, 0.3, 0.2):
        registry.release("http://127.0.0.1:1", Outcome.SUCCESS, latency=latency, tokens=50)
    now[0] = 102.0
    row = meter.view(status()).rows[0]
    assert row.tokens == 150 and row.tokens_per_s == pytest.approx(75.0)
    assert row.p50 == pytest.approx(0.2)
    now[0] = 110.0  # no new tokens for a whole window: the rate falls to zero
    meter.view(status())
    now[0] = 111.0
    assert meter.view(status()).rows[0].tokens_per_s == 0
    # Removed and added again, the node counts its tokens anew: no negative rate.
    registry.remove("http://127.0.0.1:1")
    registry.add("http://127.0.0.1:1")
    registry.modify("http://127.0.0.1:1", lambda s: s.evolve(status=NodeStatus.HEALTHY))
    now[0] = 112.0
    assert meter.view(status()).rows[0].tokens_per_s is None  # one sample again
    registry.release("http://127.0.0.1:1", Outcome.SUCCESS, latency=0.1, tokens=20)
    now[0] = 114.0
    assert meter.view(status()).rows[0].tokens_per_s == pytest.approx(10.0)


def test_every_rendering_names_columns_from_one_set(fleet: LMFleet) -> None:
    """`print(fleet)`, the HTML table and the widget call one number by one name."""
    text_head = repr(fleet).splitlines()[1]
    assert re.split(r"\s{2,}", text_head.strip()) == list(TEXT_COLUMNS)
    html_heads = [unescape(h) for h in re.findall(r"<th\b[^>]*>(.*?)</th>", fleet._repr_html_())]
    assert html_heads == list(NOTEBOOK_COLUMNS)
    board = Dashboard(fleet)
    widget_heads = [w.value for w in board.grid.children[: len(NOTEBOOK_COLUMNS) + 1]]
    assert widget_heads == [f"<b>{escape(c)}</b>" for c in (*NOTEBOOK_COLUMNS, "actions")]
    assert set(TEXT_COLUMNS) | set(NOTEBOOK_COLUMNS) <= set(COLUMN_NAMES.values())
    # One set: the text table is the notebook's, less what needs a traffic meter.
    assert [c for c in NOTEBOOK_COLUMNS if c not in METERED_COLUMNS] == list(TEXT_COLUMNS)
    assert {"latency", "p50 latency"} <= set(NOTEBOOK_COLUMNS)
