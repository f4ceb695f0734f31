"""The proxy's node list on disk, so that a restart forgets no node that registered.

LMDeploy nodes register once (`--proxy-url`), and `lmdeploy serve proxy` keeps its
node list in a file unless `--disable-cache-status`; a drop-in must do the same, or
a restarted proxy serves nothing until every node is restarted by hand. `lmfleet
serve` keeps its list in `state_path(dir, port)` (by default under the per-user XDG
state directory), `fleet.serve()` only when given `state_file=`.

What is kept per node: URL, role, models, engine, speed, priority, weight version, whether
it uses the fleet's node key (a reference, never the key itself: keys stay in the
flags and the environment), and its own settings (`NodeOptions.persisted()`: the
names of the environment variables its key and headers come from, read again on
reload, never their values; a key or header given as a value is not kept). The file
is rewritten atomically (a temporary file, then `os.replace`) whenever what it would
hold changes: at once for `/nodes/add` and `/nodes/remove`, within `KEEP_EVERY`
seconds for what the fleet learns by itself (models, weight versions). A reloaded
node is added as `starting` and probed before any request goes to it. A file that
cannot be read as a node list (truncated, foreign) is a `ConfigError` naming it,
never silently replaced.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from lmfleet.config import NodeOptions
from lmfleet.jobs.files import write_atomically
from lmfleet.node.state import NodeRole, NodeState
from lmfleet.plain_errors import ConfigError, LMFleetError

if TYPE_CHECKING:
    from lmfleet.surface import FleetSurface

log = logging.getLogger("lmfleet.proxy")

KIND = "lmfleet serve node list"
"""The `kind` every state file carries: how a file of ours is told from a foreign one."""
VERSION = 2
KNOWN_VERSIONS = frozenset({1, 2})
"""Version 1 (before `kind`, key and weight version were kept) still loads."""

KEEP_EVERY = 1.0
"""Seconds between checks for changes the fleet made by itself (models, versions)."""

FLEET_KEY = "fleet"
"""`key` of a node that uses the fleet's node key (`--node-api-key`)."""


def default_dir() -> Path:
    """`$XDG_STATE_HOME/lmfleet`, else `~/.local/state/lmfleet` (the XDG default)."""
    base = os.environ.get("XDG_STATE_HOME") or ""
    root = Path(base) if Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "lmfleet"


def state_path(directory: Path, port: int) -> Path:
    """The state file of the proxy on `port`: one per port, so that two proxies on one
    machine keep separate lists and a restart with the same flags finds its own."""
    return directory / f"serve-{port}.json"


def _own_key(options: NodeOptions | None) -> bool:
    """Whether the node's key is its own (`NodeOptions`), not the fleet's."""
    return options is not None and (options.api_key is not None or bool(options.api_key_env))


def entry(s: NodeState) -> dict[str, Any]:
    """What is kept of one node (in the file, and shared between `--workers`)."""
    return {
        "url": s.url,
        "role": int(s.role),
        "models": list(s.models),
        **({"engine": s.engine} if s.engine else {}),
        "speed": s.speed,
        "priority": s.priority,
        "weight_version": s.weight_version,
        "key": FLEET_KEY if s.api_key and not _own_key(s.options) else None,
        **({"options": s.options.persisted()} if s.options is not None else {}),
    }


def render(fleet: FleetSurface) -> str:
    """The file's text for the fleet's nodes now (compared to skip needless writes)."""
    nodes = [entry(s) for s in sorted(fleet.registry.snapshot(), key=lambda s: s.url)]
    return json.dumps({"kind": KIND, "version": VERSION, "nodes": nodes}, indent=1) + "\n"


def save(path: Path, fleet: FleetSurface) -> str:
    """Write the node list atomically; returns what was written."""
    text = render(fleet)
    _write(path, text)
    return text


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text.encode())


def read(path: Path) -> list[dict[str, Any]]:
    """The node entries of `path` ([] when it does not exist yet); `ConfigError` naming
    the file and what to do when it is not an lmfleet node list."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read the state file {path}: {exc.strerror or exc}") from exc
    fix = "move it aside, or start with --disable-cache-status"
    try:
        data: Any = json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"the state file {path} is not valid JSON (truncated or corrupt?): {exc}; {fix}"
        ) from exc
    if (
        not isinstance(data, dict)
        or data.get("kind", KIND) != KIND
        or data.get("version") not in KNOWN_VERSIONS
        or not isinstance(data.get("nodes"), list)
    ):
        raise ConfigError(f"the state file {path} is not an lmfleet serve node list; {fix}")
    return [entry for entry in data["nodes"] if isinstance(entry, dict)]


def load(path: Path, entries: list[dict[str, Any]], fleet: FleetSurface) -> int:
    """Add every node of `entries` (`read(path)`), as starting: each is probed before
    it is routed to.

    An entry the fleet refuses (a URL that no longer parses, a bad role) is logged
    and skipped; the next write leaves it out.
    """
    count = 0
    for kept in entries:
        try:
            add_entry(fleet, kept, f"reloaded from {path}")
            count += 1
        except (LMFleetError, KeyError, TypeError, ValueError) as exc:
            log.warning("state file %s: skipped %r: %s", path, kept, exc)
    return count


def add_entry(fleet: FleetSurface, kept: dict[str, Any], origin: str) -> None:
    """Add the node `kept` describes (`entry`), as starting; the fleet's error, or a
    `KeyError`, `TypeError` or `ValueError` for an entry that is not one."""
    version = kept.get("weight_version")
    fleet.add_node(
        kept["url"],
        models=[str(m) for m in kept.get("models") or []],
        role=NodeRole(int(kept.get("role") or 1)),
        registered=True,
        speed=kept.get("speed"),
        priority=kept.get("priority"),
        options=kept.get("options"),
        weight_version=int(version) if version is not None else None,
        origin=origin,
        engine=kept.get("engine"),
    )


async def keep(path: Path, fleet: FleetSurface, written: str) -> None:
    """Rewrite the file whenever what it would hold changes (a task beside the proxy)."""
    while True:
        await anyio.sleep(KEEP_EVERY)
        text = render(fleet)
        if text != written:
            try:
                await anyio.to_thread.run_sync(_write, path, text)
            except OSError as exc:
                log.warning("cannot write the state file %s: %s", path, exc.strerror or exc)
                continue
            written = text
