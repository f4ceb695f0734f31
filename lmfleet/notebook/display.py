"""How an `LMFleet` shows itself: live widget in a kernel, HTML table, or text.

`LMFleet._repr_mimebundle_` and `_repr_html_` delegate here. In a Jupyter kernel
with ipywidgets the bundle carries a live `Dashboard`; every bundle also carries
the static HTML table (frontends without widget support, nbconvert exports) and
the text table (terminals).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from lmfleet.notebook import html, stats

if TYPE_CHECKING:
    from lmfleet.notebook.dashboard import Dashboard
    from lmfleet.surface import FleetSurface

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def in_kernel() -> bool:
    """True inside a Jupyter kernel (not a terminal IPython, not plain Python)."""
    ipython_module = sys.modules.get("IPython")
    if ipython_module is None:
        return False
    shell = ipython_module.get_ipython()
    return getattr(shell, "kernel", None) is not None


def repr_html(fleet: FleetSurface) -> str:
    if fleet.runtime.closed:
        return "<b>LMFleet</b>: closed"
    return html.table(stats.meter_for(fleet).view(fleet.status()))


def dashboard(fleet: FleetSurface, *, start: bool = True) -> Dashboard:
    """A new live dashboard for `fleet` (refreshing from the fleet's loop if `start`)."""
    from lmfleet.notebook.dashboard import Dashboard

    board = Dashboard(fleet)
    if start and not fleet.runtime.closed:
        board.start()
    return board


def mimebundle(fleet: FleetSurface) -> dict[str, Any]:
    bundle: dict[str, Any] = {"text/plain": repr(fleet), "text/html": repr_html(fleet)}
    if fleet.runtime.closed or not in_kernel():
        return bundle
    try:
        import ipywidgets  # noqa: F401 - only checks that widgets are available
    except ImportError:
        return bundle
    widget_bundle = dashboard(fleet).widget._repr_mimebundle_()
    if widget_bundle and WIDGET_MIME in widget_bundle:
        bundle[WIDGET_MIME] = widget_bundle[WIDGET_MIME]
    return bundle
