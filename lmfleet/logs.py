"""Process-wide logging for the `lmfleet` commands: text or JSON lines on stderr.

A library does not configure logging: `LMFleet` and `fleet.serve()` only log to the
`lmfleet` loggers and leave handlers to the application (a notebook, a service).
The `lmfleet` commands are applications; they call `configure_logging` once, so
that an operator gets one format for everything the process logs:

- lmfleet's own records (`lmfleet`, `lmfleet.proxy`, ...): one line per node state
  change, proxy start-up, cut streams;
- uvicorn's (`uvicorn.error`, and `uvicorn.access` when the access log is on), which
  `fleet.serve()` leaves unconfigured (`log_config=None`) so they propagate here;
- nothing per health probe: the HTTP client libraries log every request they send at
  INFO ("HTTP Request: GET .../is_sleeping"), so they are held at WARNING.

`--log-format json` is for log shippers: one JSON object per line, see `JsonFormatter`.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Literal

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

QUIET_LOGGERS = ("httpx2", "httpcore2", "httpx", "httpcore")
"""HTTP client libraries that log each request at INFO: kept at WARNING, because the
fleet's monitor sends requests to every node all the time."""

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
"""uvicorn's loggers: their records go through the root's handler (one format)."""

_RESERVED = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName", "color_message"}
)
"""LogRecord's own attributes (and uvicorn's ANSI-coloured copy of its message); any
other attribute came from `extra=` and is output."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `time` (ISO 8601, UTC), `level`, `logger`, `message`,
    `exc_info` (the formatted traceback, when there is one), and every field a record
    carries from `extra=` (the node state changes carry `node`, `state`, `previous`),
    so that a log shipper can filter on them without parsing the message."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _LmfleetHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure_logging` installs: a type of its own so that calling it
    again replaces it instead of adding a second one (every line would be doubled)."""


def configure_logging(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Send every record at `level` or above to stderr as text or JSON lines.

    Replaces the handler an earlier call installed and leaves any other root handler
    alone (pytest's capture, a notebook's). Quiets the HTTP client libraries to
    WARNING and routes uvicorn's loggers through the same handler, so the proxy's
    access log (`ProxyOptions.access_log`) comes out in the same format.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    handler = _LmfleetHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LmfleetHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
