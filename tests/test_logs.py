"""`lmfleet.logs`: the JSON line format log shippers parse, and `configure_logging`."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timedelta

import pytest

from lmfleet.logs import JsonFormatter, configure_logging


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("lmfleet", logging.WARNING, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_json_line_has_time_level_logger_message_and_extra_fields() -> None:
    record = _record("node %s %s -> %s", "http://h:1", "healthy", "unhealthy", node="http://h:1")
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert list(entry)[:4] == ["time", "level", "logger", "message"]
    assert entry["level"] == "WARNING" and entry["logger"] == "lmfleet"
    assert entry["message"] == "node http://h:1 healthy -> unhealthy"
    assert entry["node"] == "http://h:1"
    stamp = datetime.fromisoformat(entry["time"])
    assert stamp.utcoffset() == timedelta(0)  # ISO 8601 with its zone: UTC
    assert abs(stamp.timestamp() - record.created) < 0.001
    assert "exc_info" not in entry


def test_json_line_carries_the_traceback_and_survives_odd_values() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        exc_info = sys.exc_info()
    record = _record("failed: %r", object(), port=8000, path=object())
    record.exc_info = exc_info
    entry = json.loads(JsonFormatter().format(record))
    assert entry["exc_info"].startswith("Traceback (most recent call last):")
    assert entry["exc_info"].endswith("ValueError: bad\nthing")
    assert entry["port"] == 8000 and entry["path"].startswith("<object object")


def test_uvicorns_coloured_copy_of_its_message_stays_out() -> None:
    record = _record("Started server process [%d]", 1, color_message="\x1b[36m%d\x1b[0m")
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "Started server process [1]" and "color_message" not in entry


def test_configure_logging_json_once_quiet_clients_uvicorn_through(
    operator_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")  # again: replaces its handler, never a second one
    configure_logging("INFO", "json")
    logging.getLogger("lmfleet").info("node %s added (attached)", "http://h:1")
    logging.getLogger("httpx2").info("HTTP Request: GET http://h:1/is_sleeping")
    logging.getLogger("httpcore2").info("send_request_headers.started")
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/readiness", "1.1", 200
    )
    logging.getLogger("lmfleet.proxy").debug("below the level")
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(e["logger"], e["message"]) for e in entries] == [
        ("lmfleet", "node http://h:1 added (attached)"),
        ("uvicorn.access", '127.0.0.1:5000 - "GET /readiness HTTP/1.1" 200'),
    ]


def test_configure_logging_text_and_bad_format(
    operator_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("warning")
    logging.getLogger("lmfleet").info("hidden")
    logging.getLogger("lmfleet").warning("node %s unhealthy", "http://h:1")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(" WARNING lmfleet: node http://h:1 unhealthy")
    with pytest.raises(ValueError, match="'text' or 'json'"):
        configure_logging("INFO", "yaml")  # type: ignore[arg-type]
