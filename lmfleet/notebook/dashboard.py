"""The live ipywidgets dashboard shown when a notebook displays an `LMFleet`.

One row per node (the columns of `status.NOTEBOOK_COLUMNS`, the state coloured) and
a line of fleet totals, refreshed about once a second by a task in the fleet's own
event loop: the kernel is never blocked. The refresh stops when the fleet closes or
the widget is closed.

The sleep / wake / drain buttons run their command in the fleet's loop too; the
outcome (or the error) appears under the table, never as a blocked cell.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from html import escape
from typing import TYPE_CHECKING, Any

import anyio
import ipywidgets as widgets

from lmfleet.notebook import html, stats
from lmfleet.notebook.stats import FleetView

if TYPE_CHECKING:
    from lmfleet.surface import FleetSurface

REFRESH_INTERVAL = 1.0
"""Seconds between two refreshes of a displayed dashboard."""

ACTIONS = ("sleep", "wake", "drain")


class NodeRowWidgets:
    """The widgets of one node's row: one HTML cell per column, then the buttons."""

    def __init__(self, url: str, on_action: Callable[[str, str], None]) -> None:
        self.url = url
        self.cells = [widgets.HTML(layout=widgets.Layout(padding="0 8px")) for _ in html.COLUMNS]
        self.buttons: dict[str, widgets.Button] = {}
        for action in ACTIONS:
            button = widgets.Button(
                description=action,
                tooltip=f"{action} {url}",
                layout=widgets.Layout(width="64px", height="26px"),
            )
            button.on_click(lambda _b, a=action: on_action(a, url))
            self.buttons[action] = button
        self.controls = widgets.HBox(list(self.buttons.values()))

    @property
    def children(self) -> list[widgets.Widget]:
        return [*self.cells, self.controls]

    def texts(self) -> dict[str, str]:
        """Column name -> the cell's HTML (what tests and users can read back)."""
        return {name: cell.value for name, cell in zip(html.COLUMNS, self.cells, strict=True)}


class Dashboard:
    """A fleet's live view. `widget` is the ipywidgets box to display."""

    def __init__(self, fleet: FleetSurface, *, interval: float = REFRESH_INTERVAL) -> None:
        self._fleet = fleet
        self._interval = interval
        self._meter = stats.meter_for(fleet)
        self._stopped = threading.Event()
        self.header = widgets.HTML()
        self.message = widgets.HTML()
        self.grid = widgets.GridBox(
            layout=widgets.Layout(
                grid_template_columns=f"repeat({len(html.COLUMNS)}, max-content) max-content",
                align_items="center",
            )
        )
        self._column_heads = [
            widgets.HTML(f"<b>{escape(name)}</b>", layout=widgets.Layout(padding="0 8px"))
            for name in html.COLUMNS
        ] + [widgets.HTML("<b>actions</b>")]
        self.rows: dict[str, NodeRowWidgets] = {}
        self.view: FleetView | None = None
        self.widget = widgets.VBox([self.header, self.grid, self.message])
        self.refresh()

    # -- refreshing -----------------------------------------------------------------

    def refresh(self) -> FleetView:
        """Read the fleet once and update every widget (any thread)."""
        if self._fleet.runtime.closed:
            self.header.value = "<b>LMFleet</b>: closed"
            self._stopped.set()
            if self.view is not None:
                return self.view
            return FleetView(strategy="", rows=[])
        view = self._meter.view(self._fleet.status())
        urls = [row.url for row in view.rows]
        if urls != list(self.rows):
            old = self.rows
            self.rows = {url: old.get(url) or NodeRowWidgets(url, self._act) for url in urls}
            children = list(self._column_heads)
            for row_widgets in self.rows.values():
                children.extend(row_widgets.children)
            self.grid.children = children
        for row in view.rows:
            for cell, text in zip(self.rows[row.url].cells, html.cells(row), strict=True):
                if cell.value != text:
                    cell.value = text
        self.header.value = html.title(view)
        self.view = view
        return view

    @property
    def running(self) -> bool:
        return not self._stopped.is_set()

    def start(self) -> None:
        """Refresh every `interval` seconds from a task in the fleet's loop."""
        self._fleet.runtime.start_soon(self._run, name="lmfleet dashboard")

    def stop(self) -> None:
        self._stopped.set()

    def _closed(self) -> bool:
        return self._stopped.is_set() or self._fleet.runtime.closed or self.widget.comm is None

    async def _run(self) -> None:
        try:
            while not self._closed():
                try:
                    self.refresh()
                except Exception as exc:  # noqa: BLE001 - shown in the widget; the fleet lives on
                    self.message.value = _error(f"dashboard stopped: {exc!r}")
                    break
                await anyio.sleep(self._interval)
        finally:  # the fleet closing cancels this task
            self._stopped.set()

    # -- buttons ----------------------------------------------------------------------

    def _act(self, action: str, url: str) -> None:
        """A button was clicked (kernel thread): run the command in the fleet's loop."""
        fleet = self._fleet
        if fleet.runtime.closed:
            self.message.value = _error("the fleet is closed")
            return
        command: Callable[[], Coroutine[Any, Any, object]]
        if action == "sleep":
            command = lambda: fleet.admin.sleep(1, [url])  # noqa: E731
        elif action == "wake":
            command = lambda: fleet.admin.wakeup(None, [url])  # noqa: E731
        else:
            command = lambda: fleet.admin.drain(url)  # noqa: E731
        self.message.value = f"{escape(action)} {escape(url)}: running&hellip;"
        future = fleet.runtime.submit(command)
        future.add_done_callback(lambda f: self._done(action, url, f))

    def _done(self, action: str, url: str, future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():
            self.message.value = _error(f"{action} {url}: cancelled")
            return
        exc = future.exception()
        if exc is not None:
            self.message.value = _error(f"{action} {url} failed: {exc}")
            return
        result = future.result()
        suffix = " (requests were still in flight at the timeout)" if result is False else ""
        self.message.value = f"{escape(action)} {escape(url)}: done{escape(suffix)}"
        self.refresh()


def _error(text: str) -> str:
    return f'<span style="color:#d62728">{escape(text)}</span>'
