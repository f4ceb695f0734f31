"""A batch's durable record: each finished item, written as it finishes.

SQLite, because it is in every Python, is one file the user can copy or open with
any tool, and commits one item atomically: the journal is in WAL mode with
`synchronous=NORMAL`, so a committed item survives the process being killed at any
moment (only a power cut can lose the last few commits), and a commit costs tens of
microseconds, not an fsync. A killed batch loses only the items that were in flight.

An item is known by its index and its key: a hash of what was asked (route, model,
input, sampling parameters). The batch is known by its fingerprint, the hash of all
its keys in order. Reopening a journal for the same batch resumes it; for another
batch (a changed prompt, another `max_tokens`) it is refused (`JournalMismatchError`)
unless the caller asks to reuse what matches item by item (`mode="reuse"`: an item
whose key was recorded under any index is not asked again) or to start over
(`mode="overwrite"`).

Failed items are recorded too (for `results()`), but only answers count as done: a
rerun asks the failed items again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmfleet.errors import ConfigError, JournalMismatchError
from lmfleet.jobs.results import BatchResult, results_from_journal

JournalMode = Literal["resume", "reuse", "overwrite"]
MODES: tuple[JournalMode, ...] = ("resume", "reuse", "overwrite")
SCHEMA = 1

_TABLES = """
CREATE TABLE IF NOT EXISTS batch (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    schema INTEGER NOT NULL,
    route TEXT NOT NULL,
    size INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    idx INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    ok INTEGER NOT NULL,
    answer TEXT,
    tokens INTEGER NOT NULL DEFAULT 0,
    versions TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    finished REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_by_key ON items (key);
"""


def item_key(route: str, model: str | None, item: Any, params: dict[str, Any]) -> str:
    """The hash of what one item asks: equal for equal requests, whatever their index."""
    asked = {"route": route, "model": model, "input": item, "params": params}
    text = json.dumps(asked, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(route: str, keys: Sequence[str]) -> str:
    digest = hashlib.sha256(route.encode())
    for key in keys:
        digest.update(key.encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Entry:
    """One recorded item: its answer (parsed JSON) or the error it ended with."""

    index: int
    key: str
    ok: bool
    answer: Any
    tokens: int
    versions: list[list[int]] | None
    error: str | None
    attempts: int
    finished: float


@dataclass(frozen=True)
class Header:
    """What the journal says about its batch."""

    schema: int
    route: str
    size: int
    fingerprint: str
    created: float


class Journal:
    """A batch's journal (see the module docstring). `Journal(path).results()` reads
    one back without a fleet; `chat_many(..., journal=path)` writes one."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise FileNotFoundError(f"no journal at {self.path}")
        if self.path.is_dir():
            raise ConfigError(f"the journal {self.path} is a directory: give a file's path")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)  # journal="runs/7/j.db"
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.OperationalError) as exc:  # not a place SQLite may write
            raise ConfigError(f"cannot open the journal {self.path}: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_TABLES)
            header = self.header()
        except sqlite3.DatabaseError as exc:  # another file, another SQLite database
            self._db.close()
            raise ConfigError(f"{self.path} is not an lmfleet batch journal ({exc})") from None
        if header is not None and header.schema != SCHEMA:
            self._db.close()
            raise ConfigError(
                f"{self.path} is a batch journal of another lmfleet (schema {header.schema}, "
                f"this one reads {SCHEMA})"
            )

    # -- the batch that writes it -------------------------------------------------------

    def begin(
        self, route: str, keys: Sequence[str], mode: JournalMode = "resume"
    ) -> dict[int, Entry]:
        """Bind the journal to the batch `keys` (one per item, in order); the items it
        already answered, by index (see the module docstring for `mode`)."""
        if mode not in MODES:
            raise ConfigError(f"journal_mode must be one of {', '.join(MODES)}, got {mode!r}")
        mark = fingerprint(route, keys)
        header = self.header()
        if header is not None and header.fingerprint == mark and mode != "overwrite":
            return {e.index: e for e in self.entries() if e.ok}
        if header is not None and mode == "resume":
            raise JournalMismatchError(_mismatch(self.path, header, route, keys, self.entries()))
        reused: dict[str, Entry] = {}
        if header is not None and mode == "reuse":
            reused = {e.key: e for e in self.entries() if e.ok}
        done: dict[int, Entry] = {}
        with self._transaction():
            self._db.execute("DELETE FROM items")
            self._db.execute(
                "INSERT OR REPLACE INTO batch VALUES (1, ?, ?, ?, ?, ?)",
                (SCHEMA, route, len(keys), mark, time.time()),
            )
            for index, key in enumerate(keys):
                old = reused.get(key)
                if old is not None:
                    done[index] = dataclasses.replace(old, index=index)
                    self._write(done[index])
        return done

    def record(
        self,
        index: int,
        key: str,
        answer: Any,
        tokens: int = 0,
        versions: list[list[int]] | None = None,
        attempts: int = 1,
    ) -> None:
        """Record item `index`'s answer (JSON-able), committed before this returns."""
        self._write(Entry(index, key, True, answer, tokens, versions, None, attempts, time.time()))

    def record_error(self, index: int, key: str, error: str, attempts: int) -> None:
        """Record that item `index` failed every attempt (a rerun asks it again)."""
        self._write(Entry(index, key, False, None, 0, None, error, attempts, time.time()))

    def _write(self, entry: Entry) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.index,
                entry.key,
                int(entry.ok),
                None if entry.answer is None else json.dumps(entry.answer, separators=(",", ":")),
                entry.tokens,
                None if entry.versions is None else json.dumps(entry.versions),
                entry.error,
                entry.attempts,
                entry.finished,
            ),
        )

    # -- reading it back ----------------------------------------------------------------

    def header(self) -> Header | None:
        row = self._db.execute(
            "SELECT schema, route, size, fingerprint, created FROM batch"
        ).fetchone()
        return None if row is None else Header(*row)

    def entries(self) -> list[Entry]:
        """Every recorded item, by index."""
        rows = self._db.execute("SELECT * FROM items ORDER BY idx").fetchall()
        return [_entry(row) for row in rows]

    def results(self) -> BatchResult[Any]:
        """The batch's results as a `BatchResult`, in input order: each answer (a
        `ChatCompletion` / `Completion` for `chat_many` / `complete_many`, else its
        JSON), or an `ItemError` where the item failed or has not finished."""
        header = self.header()
        if header is None:
            return BatchResult([], elapsed=0.0, tokens=0)
        return results_from_journal(header.route, header.size, {e.index: e for e in self.entries()})

    def export_jsonl(self, path: str | os.PathLike[str]) -> int:
        """Write one JSON line per recorded item (`index`, `ok`, `answer` or `error`,
        `tokens`, `weight_versions`); the number of lines."""
        count = 0
        with open(path, "w", encoding="utf-8") as out:
            for entry in self.entries():
                line = {
                    "index": entry.index,
                    "ok": entry.ok,
                    "answer": entry.answer,
                    "error": entry.error,
                    "tokens": entry.tokens,
                    "weight_versions": entry.versions,
                    "attempts": entry.attempts,
                }
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                count += 1
        return count

    def counts(self) -> tuple[int, int]:
        """(answered, failed) items recorded."""
        row = self._db.execute("SELECT SUM(ok), SUM(1 - ok) FROM items").fetchone()
        return int(row[0] or 0), int(row[1] or 0)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        header = self.header()
        if header is None:
            return f"<Journal {self.path}: empty>"
        answered, failed = self.counts()
        return (
            f"<Journal {self.path}: {header.route}, {answered}/{header.size} answered, "
            f"{failed} failed>"
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if kind is not None else "COMMIT")


def _entry(row: Iterable[Any]) -> Entry:
    index, key, ok, answer, tokens, versions, error, attempts, finished = row
    return Entry(
        index=index,
        key=key,
        ok=bool(ok),
        answer=None if answer is None else json.loads(answer),
        tokens=tokens,
        versions=None if versions is None else json.loads(versions),
        error=error,
        attempts=attempts,
        finished=finished,
    )


def _mismatch(
    path: Path, header: Header, route: str, keys: Sequence[str], entries: list[Entry]
) -> str:
    """Why the journal is not this batch's, as precisely as the journal can say."""
    if header.route != route:
        what = f"it records a {header.route!r} batch, this is a {route!r} one"
    else:
        recorded = {e.index: e.key for e in entries}
        first = next(_differences(recorded, keys), None)
        what = f"it has {header.size} items, this batch {len(keys)}"
        if first is not None:
            what += f"; item {first} asks something else"
    return (
        f"the journal {path} belongs to a different batch ({what}). Pass "
        "journal_mode='reuse' to reuse its answers item by item (an item asked again "
        "identically is not sent), or journal_mode='overwrite' to start it over, or "
        "use another path."
    )


def _differences(recorded: dict[int, str], keys: Sequence[str]) -> Iterator[int]:
    for index, key in enumerate(keys):
        if index in recorded and recorded[index] != key:
            yield index
