"""Optional persistence of the fleet's nodes: url, models and role, never keys.

Written atomically (a temporary file, then `os.replace`) after every change made
through the proxy, and read at start so a restarted proxy keeps its nodes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmfleet.errors import ConfigError, LMFleetError
from lmfleet.state import NodeRole

if TYPE_CHECKING:
    from lmfleet.surface import FleetSurface

log = logging.getLogger("lmfleet.proxy")
VERSION = 1


def save(path: Path, fleet: FleetSurface) -> None:
    nodes = [
        {"url": s.url, "models": list(s.models), "role": int(s.role), "speed": s.speed}
        for s in fleet.registry.snapshot()
    ]
    text = json.dumps({"version": VERSION, "nodes": nodes}, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, fleet: FleetSurface) -> int:
    """Add every node the file lists (as registered: probed until it answers)."""
    if not path.exists():
        return 0
    try:
        data: Any = json.loads(path.read_text())
        entries = data["nodes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"state file {path} is not an lmfleet node list: {exc!r}") from exc
    count = 0
    for entry in entries:
        try:
            fleet.add_node(
                entry["url"],
                models=[str(m) for m in entry.get("models", [])],
                role=NodeRole(int(entry.get("role", 1))),
                registered=True,
                speed=entry.get("speed"),
            )
            count += 1
        except (LMFleetError, KeyError, TypeError, ValueError) as exc:
            log.warning("state file %s: skipped %r: %s", path, entry, exc)
    return count
