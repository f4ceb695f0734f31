"""OpenAI Batch API objects kept in a directory, and the lines of a batch's input file.

A batch is `<id>.json` (its OpenAI `batch` object, rewritten atomically at every
change of status or counts) and `<id>.sqlite` (its journal: each line's answer as it
finishes). A restarted proxy finds every batch that was not finished and runs it
again from its journal, so no finished line is asked twice.

Several processes may share the directory (`lmfleet serve --workers N`): a batch
runs in the one process that holds its lock (`<id>.lock`, an flock the kernel drops
when that process dies, so another can claim it and resume from the journal), and
only that process writes the batch's object; the others ask it to cancel through a
`<id>.cancel` file.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmfleet.errors import UnknownObjectError
from lmfleet.jobs.files import write_atomically

try:
    import fcntl
except ImportError:  # Windows: one process, no lock needed
    fcntl = None  # type: ignore[assignment]

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
"""What a batch may call here (OpenAI's list, less `/v1/responses`: LMDeploy 0.18's
is not a drop-in)."""
COMPLETION_WINDOWS = ("24h",)
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
"""Statuses a restarted proxy picks up again."""


def new_batch(
    input_file_id: str, endpoint: str, window: str, metadata: dict[str, Any] | None
) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": "batch_" + secrets.token_hex(12),
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": None,
        "expires_at": now + 24 * 3600,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata,
    }


class BatchStore:
    """Batch objects and their journals under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._held: dict[str, int] = {}
        """Batches this process runs -> their lock's file descriptor."""

    def save(self, batch: dict[str, Any]) -> None:
        write_atomically(self.root / f"{batch['id']}.json", json.dumps(batch).encode())

    def get(self, batch_id: str) -> dict[str, Any]:
        if not batch_id.startswith("batch_") or not batch_id[6:].isalnum():
            raise UnknownObjectError(f"No such Batch object: {batch_id}")
        try:
            found: dict[str, Any] = json.loads((self.root / f"{batch_id}.json").read_text())
        except (FileNotFoundError, ValueError):
            raise UnknownObjectError(f"No such Batch object: {batch_id}") from None
        return found

    def journal_path(self, batch_id: str) -> Path:
        return self.root / f"{batch_id}.sqlite"

    def drop_journal(self, batch_id: str) -> None:
        """Delete a finished batch's journal (and SQLite's WAL files beside it): its
        answers are in its output and error files now."""
        path = self.journal_path(batch_id)
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)

    def claim(self, batch_id: str) -> bool:
        """Take the batch's lock for this process (False: another process runs it)."""
        if batch_id in self._held:
            return True
        if fcntl is None:
            self._held[batch_id] = -1
            return True
        fd = os.open(self.root / f"{batch_id}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._held[batch_id] = fd
        return True

    def release(self, batch_id: str) -> None:
        fd = self._held.pop(batch_id, -1)
        if fd >= 0:
            os.close(fd)

    def holds(self, batch_id: str) -> bool:
        return batch_id in self._held

    def ask_cancel(self, batch_id: str) -> None:
        """Ask the process that runs the batch to cancel it."""
        (self.root / f"{batch_id}.cancel").touch()

    def cancel_asked(self, batch_id: str) -> bool:
        return (self.root / f"{batch_id}.cancel").exists()

    def cancel_answered(self, batch_id: str) -> None:
        (self.root / f"{batch_id}.cancel").unlink(missing_ok=True)

    def list(self) -> list[dict[str, Any]]:
        found = []
        for path in self.root.glob("batch_*.json"):
            try:
                found.append(json.loads(path.read_text()))
            except ValueError:
                continue
        return sorted(found, key=lambda batch: (batch["created_at"], batch["id"]), reverse=True)


@dataclass(frozen=True)
class Line:
    """One line of a batch's input file: a request to send, or why it cannot be."""

    index: int
    custom_id: str | None
    body: dict[str, Any] | None
    error: str | None = None
    raw: str = ""


def parse_lines(data: bytes, endpoint: str) -> list[Line]:
    """Every non-empty line of an input file, each valid or with its own error (a
    malformed line fails alone, as OpenAI reports it in the error file)."""
    lines: list[Line] = []
    seen: set[str] = set()
    for text in data.decode("utf-8", errors="replace").splitlines():
        if not text.strip():
            continue
        index = len(lines)
        try:
            item = json.loads(text)
        except ValueError:
            lines.append(Line(index, None, None, "the line is not valid JSON", text))
            continue
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        problem = _problem(item, endpoint, seen)
        if isinstance(custom_id, str):
            seen.add(custom_id)
        if problem is not None:
            shown = custom_id if isinstance(custom_id, str) else None
            lines.append(Line(index, shown, None, problem, text))
            continue
        lines.append(Line(index, custom_id, item["body"], None, text))
    return lines


def _problem(item: Any, endpoint: str, seen: set[str]) -> str | None:
    if not isinstance(item, dict):
        return "the line must be a JSON object"
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "custom_id must be a non-empty string"
    if custom_id in seen:
        return f"custom_id {custom_id!r} is used by an earlier line"
    if item.get("method") != "POST":
        return "method must be POST"
    if item.get("url") != endpoint:
        return f"url must be the batch's endpoint {endpoint}, got {item.get('url')!r}"
    if not isinstance(item.get("body"), dict):
        return "body must be a JSON object"
    return None
