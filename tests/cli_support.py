"""Run the real `lmfleet` console script as a process and read what it prints (tests/cli)."""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

LMFLEET = Path(sys.executable).with_name("lmfleet")
"""The console script pip installed for this venv (`[project.scripts]`)."""


def run_lmfleet(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `lmfleet ARGS` to its end; the caller asserts on status and output."""
    return subprocess.run(
        [str(LMFLEET), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


class Console:
    """A running `lmfleet` command whose stderr and stdout lines are collected as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [str(LMFLEET), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # our signals only, never the terminal's
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._new.put(line.rstrip("\n"))
        self._new.put(None)

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first line (seen so far or coming) that matches `pattern`."""
        for line in self.lines:
            if found := re.search(pattern, line):
                return found
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self._drain_wait()
                pytest.fail(f"lmfleet exited ({self.proc.returncode}) before {pattern!r}:\n{self}")
            self.lines.append(line)
            if found := re.search(pattern, line):
                return found
        pytest.fail(f"no line matching {pattern!r} after {timeout:g} s:\n{self}")

    def _drain_wait(self) -> None:
        self.proc.wait(timeout=5)

    def stop(self, signum: int, timeout: float = 60) -> int:
        """Send `signum`, wait for the exit, collect the rest of the output."""
        self.proc.send_signal(signum)
        status = self.proc.wait(timeout=timeout)
        while (line := self._next_line()) is not None:
            self.lines.append(line)
        return status

    def _next_line(self) -> str | None:
        try:
            return self._new.get(timeout=5)
        except queue.Empty:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __str__(self) -> str:
        return "\n".join(self.lines[-40:])


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `lmfleet NAME`, as `lmfleet NAME --help` prints it."""
    from lmfleet.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices[name]
    return parser


def help_text(parser: argparse.ArgumentParser, flag: str) -> str:
    """The help of `flag` as `--help` prints it (`%(default)s` and the like filled in)."""
    action = next(a for a in parser._actions if flag in a.option_strings)
    return " ".join(parser._get_formatter()._expand_help(action).split())


def help_gaps(parser: argparse.ArgumentParser) -> list[str]:
    """The options of `parser` whose help is missing or leaves their default unsaid.

    Every option needs a help text; one whose default is a value (not None, False or
    empty: those mean "off" or "not given") must say `default` and spell the value,
    so that `--help` alone tells what an absent flag means.
    """
    gaps = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        if not action.help or action.help is argparse.SUPPRESS:
            gaps.append(f"{flag}: no help")
            continue
        default = action.default
        off = default is None or default is False or default is argparse.SUPPRESS
        if off or (isinstance(default, (list, tuple)) and not default):
            continue
        text = help_text(parser, flag)
        spellings = {str(default)} | ({f"{default:g}"} if isinstance(default, float) else set())
        said = any(re.search(rf"(?<![\w.]){re.escape(s)}(?![\w.])", text) for s in spellings)
        if "default" not in text or not said:
            gaps.append(f"{flag}: its help does not state its default {default!r}: {text!r}")
    return gaps


def group_of(parser: argparse.ArgumentParser, flag: str) -> str | None:
    """The title of the argument group `flag` is listed under."""
    return next(
        g.title for g in parser._action_groups for a in g._group_actions if flag in a.option_strings
    )
