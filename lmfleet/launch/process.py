"""One child process that must never outlive its owner.

Three layers keep that promise: the child runs in its own session (so a signal
reaches its whole process group), it is started with PR_SET_PDEATHSIG on Linux (so
the kernel signals it when the owning thread dies, even by SIGKILL), and
`terminate()` sends SIGTERM to the group, then SIGKILL after a grace period.

PR_SET_PDEATHSIG fires when the *thread* that forked exits: spawn from a
long-lived thread (the fleet spawns from its portal thread), never from a
short-lived worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from lmfleet.plain_errors import LaunchError

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
"""Where Linux says which ports it hands out itself (`bind(0)`, outgoing connections)."""

LOWEST_PORT = 10_000
"""The lowest port `free_port` picks below the kernel's range."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the child binds it right after).

    Taken below the kernel's ephemeral range when there is room: a port in that
    range may be handed to any process's outgoing connection or `bind(0)` between
    this check and the child's bind (a launched node then exits with "port in use":
    it happened to a test beside others making connections). Below it, ports are
    handed out in turn from a random start (`_next_port`), so that two calls of this
    process never return the same port while the first child is still starting (a
    random pick each time did, once in a full test run: two nodes on one port), and
    another process walking from its own start rarely meets this one.
    """
    global _next_port
    low = _ephemeral_low()
    room = low - LOWEST_PORT
    if room >= 1000:
        with _NEXT:
            start = _next_port if _next_port is not None else random.randrange(room)
            for step in range(min(room, 1000)):
                port = LOWEST_PORT + (start + step) % room
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    try:
                        sock.bind((host, port))
                    except OSError:
                        continue
                _next_port = (port - LOWEST_PORT + 1) % room
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


_NEXT = threading.Lock()
"""Guards `_next_port`: fleets launch nodes from several threads."""
_next_port: int | None = None
"""Where the next `free_port` looks first, as an offset from `LOWEST_PORT`."""


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (0 where it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class ManagedProcess:
    """A child process with its output in a log file and a guaranteed end."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, **(env or {})}
        with open(log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """None while running; the exit status once it has ended."""
        return self._popen.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def terminate(self, grace: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds; idempotent."""
        if self._popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._popen.wait(timeout=5.0)
        # The leader is gone; make sure nothing else of its group survives it.
        self._signal_group(signal.SIGKILL)
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL the process alone, as a crash would (tests, chaos)."""
        with contextlib.suppress(ProcessLookupError):
            self._popen.send_signal(signal.SIGKILL)
        self._popen.wait(timeout=5.0)

    def wait(self, timeout: float | None = None) -> int:
        return self._popen.wait(timeout=timeout)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, sig)


def wait_for_port(host: str, port: int, timeout: float, proc: ManagedProcess | None = None) -> None:
    """Block until `host:port` accepts connections; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.returncode is not None:
            raise LaunchError(
                f"process exited with status {proc.returncode} before opening port {port}:\n"
                f"{proc.log_tail()}"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {host}:{port} did not open within {timeout} s")
        time.sleep(0.05)
