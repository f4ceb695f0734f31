"""The files of OpenAI's Files API, kept in a directory (the Batch API's inputs and outputs).

One file is two entries in `root`: `<id>` (its bytes) and `<id>.json` (its OpenAI
`file` object). Both are written atomically (a temporary file, then `os.replace`),
the bytes first, so a proxy killed mid-upload leaves no file that lists bytes it
does not have.

Files expire as OpenAI's do: 30 days after they are made unless their
`expires_after` says otherwise (one hour to 30 days), so that a proxy that runs for
months does not keep every batch's prompts and answers for ever. An expired file is
gone for its callers at once; `expire` deletes its bytes.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from lmfleet.jobs.owners import OWNER, shown, visible
from lmfleet.plain_errors import ConfigError, UnknownObjectError

PURPOSES = frozenset({"batch", "batch_output"})
"""What a file may be for here: batch inputs, and the outputs the batches write."""
KEEP_SECONDS = 30 * 24 * 3600
"""How long a file is kept when nobody says (OpenAI's default for batch files)."""
SHORTEST_KEEP = 3600
"""The shortest `expires_after` OpenAI allows (and the longest is `KEEP_SECONDS`)."""


def expiry(asked: object, what: str = "expires_after") -> int:
    """Seconds a file is kept, from an OpenAI expiration policy
    (`{"anchor": "created_at", "seconds": N}`; None: the default)."""
    if asked is None:
        return KEEP_SECONDS
    if not isinstance(asked, dict) or asked.get("anchor") != "created_at":
        raise ConfigError(f'{what} must be {{"anchor": "created_at", "seconds": N}}')
    seconds = asked.get("seconds")
    if isinstance(seconds, str) and seconds.isdigit():  # a form field's (an upload)
        seconds = int(seconds)
    if not isinstance(seconds, int) or not SHORTEST_KEEP <= seconds <= KEEP_SECONDS:
        raise ConfigError(
            f"{what}.seconds must be a number from {SHORTEST_KEEP} (one hour) to "
            f"{KEEP_SECONDS} (30 days), got {seconds!r}"
        )
    return seconds


def expired(item: dict[str, Any], now: float) -> bool:
    """Whether the file's time is up (a file made before files expired never is)."""
    expires_at = item.get("expires_at")
    return isinstance(expires_at, int) and expires_at <= now


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
        self,
        data: bytes,
        *,
        filename: str,
        purpose: str,
        owner: str | None = None,
        keep: int = KEEP_SECONDS,
    ) -> dict[str, Any]:
        """A new file, kept `keep` seconds (`expiry`)."""
        if purpose not in PURPOSES:
            raise ConfigError(
                f"purpose must be 'batch' here (the Batch API's files), got {purpose!r}"
            )
        file_id = "file-" + secrets.token_hex(12)
        write_atomically(self.root / file_id, data)
        now = int(time.time())
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": now,
            "expires_at": now + keep,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
        }
        if owner is not None:
            meta[OWNER] = owner
        write_atomically(self.root / f"{file_id}.json", json.dumps(meta).encode())
        return shown(meta)

    def get(
        self, file_id: str, owner: str | None = None, *, expired_too: bool = False
    ) -> dict[str, Any]:
        """The file object; `expired_too`: even past its time (a running batch's
        input, which `expire` keeps until the batch ends)."""
        meta = self._meta_path(file_id)
        try:
            found: dict[str, Any] = json.loads(meta.read_text())
        except (FileNotFoundError, ValueError):
            found = {}
        gone = not found or (not expired_too and expired(found, time.time()))
        if gone or not visible(found, owner):
            raise UnknownObjectError(f"No such File object: {file_id}")
        return shown(found)

    def content(
        self, file_id: str, owner: str | None = None, *, expired_too: bool = False
    ) -> bytes:
        self.get(file_id, owner, expired_too=expired_too)
        try:
            return (self.root / file_id).read_bytes()
        except FileNotFoundError:  # expired and deleted between the two reads
            raise UnknownObjectError(f"No such File object: {file_id}") from None

    def delete(self, file_id: str, owner: str | None = None) -> dict[str, Any]:
        self.get(file_id, owner)
        self._meta_path(file_id).unlink(missing_ok=True)
        (self.root / file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    def list(self, purpose: str | None = None, owner: str | None = None) -> list[dict[str, Any]]:
        found, now = [], time.time()
        for meta in self.root.glob("file-*.json"):
            try:
                item = json.loads(meta.read_text())
            except ValueError:
                continue
            if purpose is not None and item.get("purpose") != purpose:
                continue
            if visible(item, owner) and not expired(item, now):
                found.append(shown(item))
        return sorted(found, key=lambda item: (item["created_at"], item["id"]), reverse=True)

    def expire(self, keep: frozenset[str] = frozenset()) -> tuple[str, ...]:
        """Delete every file past its time but those in `keep` (running batches'
        inputs); the ids deleted."""
        now, deleted = time.time(), set[str]()
        for meta in self.root.glob("file-*.json"):
            try:
                item = json.loads(meta.read_text())
            except (FileNotFoundError, ValueError):
                continue
            if expired(item, now) and item.get("id") not in keep:
                meta.unlink(missing_ok=True)  # the object first: never bytes without it
                (self.root / meta.name.removesuffix(".json")).unlink(missing_ok=True)
                deleted.add(str(item.get("id")))
        return tuple(sorted(deleted))

    def _meta_path(self, file_id: str) -> Path:
        if not file_id.startswith("file-") or not file_id[5:].isalnum():
            raise UnknownObjectError(f"No such File object: {file_id}")
        return self.root / f"{file_id}.json"
