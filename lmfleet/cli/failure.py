"""What the `lmfleet` command prints for an error: one line an operator can act on.

A configuration mistake (a bad flag value, a busy port, a missing extra, no GPUs)
is the user's to fix, and a traceback buries the one sentence that says how.
Only errors we understand are condensed; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

from collections.abc import Callable

import pydantic

from lmfleet.plain_errors import ConfigError, LMFleetError


def validation_summary(error: pydantic.ValidationError, spell: Callable[[str], str] = str) -> str:
    """`field: message (got value)` for each problem, on one line; `spell` writes a
    field's name as the user wrote it (a `--node` setting is `health-path`)."""
    parts = []
    for item in error.errors():
        where = ".".join(spell(str(part)) for part in item["loc"]) or error.title
        got = f" (got {item['input']!r})" if "input" in item and item["loc"] else ""
        parts.append(f"{where}: {item['msg']}{got}")
    return "invalid option " + "; ".join(parts)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def describe(exc: BaseException) -> tuple[str, str] | None:
    """(headline, details) for an error the user can fix; None for a bug.

    Configuration and OS errors are a single line with no details. Other fleet
    errors (a node that exited, nodes not ready) keep their first line as the
    headline and the rest (a log tail, the status table) as details.
    """
    if isinstance(exc, pydantic.ValidationError):
        return validation_summary(exc), ""
    if isinstance(exc, ConfigError):
        if isinstance(exc.__cause__, pydantic.ValidationError):
            return validation_summary(exc.__cause__), ""
        return _one_line(str(exc)), ""
    if isinstance(exc, LMFleetError):
        headline, _, details = str(exc).strip().partition("\n")
        return headline, details.rstrip()
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return _one_line(f"{exc.strerror or exc}{where}"), ""
    return None
