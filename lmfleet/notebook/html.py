"""The dashboard as a static HTML table: where widgets are unavailable (`_repr_html_`).

Everything user-controlled (URLs, model names, messages) is escaped. Node API keys
never reach this module: `NodeSnapshot` has no field for them.
"""

from __future__ import annotations

from html import escape

from lmfleet.node.views import NOTEBOOK_COLUMNS, engine_cell, queue_cell, recent_errors_cell
from lmfleet.notebook.stats import STATE_COLOURS, FleetView, NodeRow, fmt_ms, fmt_rate

COLUMNS = NOTEBOOK_COLUMNS
"""This table's and the live dashboard's column names (named once, in lmfleet/node/views.py)."""

_CELL = "padding:2px 10px;text-align:left;"
_NUM = "padding:2px 10px;text-align:right;font-variant-numeric:tabular-nums;"


def state_badge(row: NodeRow) -> str:
    colour = STATE_COLOURS.get(row.state, "#333")
    title = f' title="{escape(row.message)}"' if row.message else ""
    return (
        f'<span style="color:{colour};font-weight:bold"{title}>&#9679; '
        f"{escape(row.state.value)}</span>"
    )


def cells(row: NodeRow) -> list[str]:
    """The HTML of each column of one row, in `COLUMNS` order."""
    return [
        f"<code>{escape(row.url)}</code>",
        state_badge(row),
        escape(engine_cell(row.engine, row.engine_version)),
        escape(", ".join(row.models) or "-"),
        str(row.priority),
        str(row.inflight),
        escape(queue_cell(row.queue, row.queue_age, row.queue_current)),
        str(row.served),
        str(row.errors),
        recent_errors_cell(row.error_rate, row.recent_answers),
        fmt_ms(row.latency),
        fmt_ms(row.p50),
        fmt_ms(row.ttft),
        fmt_rate(row.tokens_per_s),
        f"v{row.weight_version}",
    ]


def title(view: FleetView) -> str:
    return (
        f"<b>LMFleet</b>: {view.healthy}/{len(view.rows)} healthy &middot; "
        f"strategy <code>{escape(view.strategy)}</code> &middot; {view.inflight} in flight "
        f"&middot; {view.served} requests &middot; {view.errors} errors &middot; "
        f"{fmt_rate(view.tokens_per_s)} tokens/s"
    )


def table(view: FleetView) -> str:
    """A self-contained HTML table (no JavaScript) of the whole fleet."""
    head = "".join(f'<th style="{_CELL}">{escape(c)}</th>' for c in COLUMNS)
    body = []
    for row in view.rows:
        tds = [
            f'<td style="{_CELL if i < 3 else _NUM}">{cell}</td>'
            for i, cell in enumerate(cells(row))
        ]
        body.append(f"<tr>{''.join(tds)}</tr>")
    if not view.rows:
        body.append(f'<tr><td colspan="{len(COLUMNS)}" style="{_CELL}">no nodes</td></tr>')
    return (
        f'<div class="lmfleet-status"><div style="margin-bottom:4px">{title(view)}</div>'
        f'<table style="border-collapse:collapse"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )
