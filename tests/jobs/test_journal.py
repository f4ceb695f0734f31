"""Batch journals (jobs/journal.py): `chat_many(..., journal=PATH)` over real sims,
a batch process SIGKILLed half-way and rerun, and a journal read back without a fleet."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from support import SimNode, StartSim, sim_stats, wait_until

from lmfleet import ConfigError, ItemError, Journal, JournalMismatchError, LMFleet
from lmfleet.jobs.journal import item_key

CHAT = "/v1/chat/completions"
N = 160
CONCURRENCY = 8

pytestmark = pytest.mark.xdist_group("journal")


@pytest.fixture
def sims(start_sim: StartSim) -> list[SimNode]:
    slow = ("--ttft-ms", "20", "--tpot-ms", "5", "--output-tokens", "8")
    return [start_sim(*slow) for _ in range(2)]


@pytest.fixture
def fleet(sims: list[SimNode]) -> Iterator[LMFleet]:
    with LMFleet.attach([s.url for s in sims], health_interval=0.2, wait_for_node=10) as fleet:
        fleet.wait_ready(timeout=30, min_ready=2)
        yield fleet


def prompts(n: int, tag: str = "q") -> list[list[ChatCompletionMessageParam]]:
    return [[{"role": "user", "content": f"{tag} {i}"}] for i in range(n)]


def served(sims: list[SimNode]) -> int:
    return sum(sim_stats(s.url)["by_path"].get(CHAT, 0) for s in sims)


def answered(path: Path) -> int:
    if not path.exists():
        return 0
    with Journal(path) as journal:
        return journal.counts()[0]


BATCH = """
import sys
from lmfleet import LMFleet
urls, journal = sys.argv[1].split(","), sys.argv[2]
n, concurrency = int(sys.argv[3]), int(sys.argv[4])
prompts = [[{"role": "user", "content": f"q {i}"}] for i in range(n)]
with LMFleet.attach(urls, health_interval=0.2) as fleet:
    fleet.wait_ready(timeout=30)
    fleet.chat_many(prompts, journal=journal, concurrency=concurrency, max_tokens=8, progress=False)
print("finished")
"""


def test_a_killed_batch_resumes_from_its_journal(
    sims: list[SimNode], fleet: LMFleet, tmp_path: Path
) -> None:
    path = tmp_path / "eval.sqlite"
    script = tmp_path / "batch.py"
    script.write_text(textwrap.dedent(BATCH))
    urls = ",".join(s.url for s in sims)
    child = subprocess.Popen(
        [sys.executable, str(script), urls, str(path), str(N), str(CONCURRENCY)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: answered(path) >= N // 2, 60, "half the batch in the journal")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(10)
    kept = answered(path)
    assert N // 2 <= kept < N, "killed half-way, not after the end"
    result = fleet.chat_many(
        prompts(N), journal=path, concurrency=CONCURRENCY, max_tokens=8, progress=False
    )
    assert len(result) == N and not result.errors
    assert result.resumed == kept
    # Only the items in flight when the process died were asked twice.
    assert served(sims) <= N + CONCURRENCY
    # In input order: each answer is the one its own prompt gets.
    again = fleet.chat_many(prompts(N)[:5], max_tokens=8, progress=False)
    assert [a.choices[0].message.content for a in again.ok] == result.texts[:5]
    assert [a.choices[0].message.content for a in result.ok] == result.texts
    # A third run asks nothing.
    before = served(sims)
    third = fleet.chat_many(prompts(N), journal=path, max_tokens=8, progress=False)
    assert third.resumed == N and served(sims) == before
    assert third.texts == result.texts


def test_another_batch_is_refused_reused_or_overwritten(
    sims: list[SimNode], fleet: LMFleet, tmp_path: Path
) -> None:
    path = tmp_path / "j.sqlite"
    first = fleet.chat_many(prompts(6), journal=path, max_tokens=4, progress=False)
    assert len(first.ok) == 6
    changed = prompts(6)
    changed[3] = [{"role": "user", "content": "something else"}]
    with pytest.raises(JournalMismatchError, match="item 3 asks something else") as caught:
        fleet.chat_many(changed, journal=path, max_tokens=4, progress=False)
    assert "journal_mode='reuse'" in str(caught.value)
    with pytest.raises(JournalMismatchError):  # other parameters: another batch too
        fleet.chat_many(prompts(6), journal=path, max_tokens=5, progress=False)
    before = served(sims)
    reused = fleet.chat_many(
        changed, journal=path, journal_mode="reuse", max_tokens=4, progress=False
    )
    assert reused.resumed == 5 and served(sims) == before + 1
    assert reused.texts[:3] == first.texts[:3] and reused.texts[4:] == first.texts[4:]
    fresh = fleet.chat_many(
        changed, journal=path, journal_mode="overwrite", max_tokens=4, progress=False
    )
    assert fresh.resumed == 0 and served(sims) == before + 7
    with pytest.raises(ConfigError, match="journal_mode"):
        fleet.chat_many(changed, journal=path, journal_mode="bogus", progress=False)  # type: ignore[arg-type]


def test_a_journal_reads_back_without_a_fleet(
    sims: list[SimNode], fleet: LMFleet, tmp_path: Path
) -> None:
    path = tmp_path / "j.sqlite"
    asked = [*prompts(4), [{"role": "user", "content": "x"}]]
    done = fleet.chat_many(asked, journal=path, max_tokens=3, progress=False)
    fleet.chat_many(
        asked,
        journal=path,
        model="no-such-model",
        journal_mode="overwrite",
        progress=False,
        max_tokens=3,
    )  # every item fails: recorded as errors
    fleet.chat_many(asked[:4], journal=path, journal_mode="reuse", max_tokens=3, progress=False)
    with Journal(path) as journal:
        results = journal.results()
        assert len(results) == 4 and not results.errors
        assert all(isinstance(r, ChatCompletion) for r in results)
        assert results.texts == done.texts[:4]
        assert results.weight_versions == [[[0, 3, 0]]] * 4
        lines = journal.export_jsonl(tmp_path / "out.jsonl")
    assert lines == 4
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["answer"]["choices"][0]["message"]["content"] == done.texts[0]
    with pytest.raises(FileNotFoundError):
        Journal(tmp_path / "missing.sqlite")


def test_failed_and_unfinished_items_read_back_as_item_errors(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    keys = [item_key("chat", "m", i, {}) for i in range(3)]
    with Journal(path, create=True) as journal:
        assert journal.begin("chat", keys) == {}
        journal.record_error(1, keys[1], "APIConnectionError('gone')", attempts=3)
    with Journal(path) as journal:
        results = journal.results()
    assert len(results) == 3 and results.ok == []
    first, failed, _ = results
    assert isinstance(first, ItemError) and "no answer" in str(first.error)
    assert isinstance(failed, ItemError) and failed.attempts == 3
    assert "gone" in str(failed.error)


def test_a_file_that_is_no_journal_is_a_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a database, but long enough to be read as one " * 20)
    with pytest.raises(ConfigError, match="is not an lmfleet batch journal"):
        Journal(text)
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE items (name TEXT)")  # someone else's table of that name
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="is not an lmfleet batch journal"):
        Journal(other).begin("chat", ["k"])


def test_a_journal_path_is_made_or_refused_by_name(tmp_path: Path) -> None:
    """`journal="runs/7/j.db"` makes its folders, as a run's outputs would; a folder,
    or a place SQLite cannot write, is a `ConfigError` naming the path (it was
    SQLite's bare "unable to open database file")."""
    nested = tmp_path / "runs" / "7" / "j.db"
    Journal(nested, create=True).begin("chat", ["k"])
    assert nested.is_file()
    with pytest.raises(ConfigError, match=f"the journal {tmp_path} is a directory"):
        Journal(tmp_path, create=True)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"cannot open the journal .*a-file/j\.db"):
        Journal(blocker / "j.db", create=True)
