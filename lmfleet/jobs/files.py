"""The files of OpenAI's Files API, kept in a directory (the Batch API's inputs and outputs).

One file is two entries in `root`: `<id>` (its bytes) and `<id>.json` (its OpenAI
`file` object). Both are written atomically (a temporary file, then `os.replace`),
the bytes first, so a proxy killed mid-upload leaves no file that lists bytes it
does not have.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from lmfleet.errors import ConfigError, UnknownObjectError
from lmfleet.jobs.owners import OWNER, shown, visible

PURPOSES = frozenset({"batch", "batch_output"})
"""What a file may be for here: batch inputs, and the outputs the batches write."""


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` whole or not at all (a temporary file beside it,
    fsynced, then `os.replace`): a process killed mid-write leaves the old file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class FileStore:
    """OpenAI file objects and their bytes under `root`. Every method takes the
    caller's `owner` (lmfleet/jobs/owners.py; None: anyone's) and answers objects as
    OpenAI's API shows them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def create(
        self, data: bytes, *, filename: str, purpose: str, owner: str | None = None
    ) -> dict[str, Any]:
        if purpose not in PURPOSES:
            raise ConfigError(
                f"purpose must be 'batch' here (the Batch API's files), got {purpose!r}"
            )
        file_id = "file-" + secrets.token_hex(12)
        write_atomically(self.root / file_id, data)
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "expires_at": None,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
        }
        if owner is not None:
            meta[OWNER] = owner
        write_atomically(self.root / f"{file_id}.json", json.dumps(meta).encode())
        return shown(meta)

    def get(self, file_id: str, owner: str | None = None) -> dict[str, Any]:
        meta = self._meta_path(file_id)
        try:
            found: dict[str, Any] = json.loads(meta.read_text())
        except (FileNotFoundError, ValueError):
            found = {}
        if not found or not visible(found, owner):
            raise UnknownObjectError(f"No such File object: {file_id}")
        return shown(found)

    def content(self, file_id: str, owner: str | None = None) -> bytes:
        self.get(file_id, owner)
        return (self.root / file_id).read_bytes()

    def delete(self, file_id: str, owner: str | None = None) -> dict[str, Any]:
        self.get(file_id, owner)
        self._meta_path(file_id).unlink(missing_ok=True)
        (self.root / file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    def list(self, purpose: str | None = None, owner: str | None = None) -> list[dict[str, Any]]:
        found = []
        for meta in self.root.glob("file-*.json"):
            try:
                item = json.loads(meta.read_text())
            except ValueError:
                continue
            if (purpose is None or item.get("purpose") == purpose) and visible(item, owner):
                found.append(shown(item))
        return sorted(found, key=lambda item: item["created_at"], reverse=True)

    def _meta_path(self, file_id: str) -> Path:
        if not file_id.startswith("file-") or not file_id[5:].isalnum():
            raise UnknownObjectError(f"No such File object: {file_id}")
        return self.root / f"{file_id}.json"
