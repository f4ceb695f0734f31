"""Ctrl-C (SIGINT) and SIGTERM end every subcommand quietly with status 0.

Two copies of each command run side by side; one gets SIGINT, the other SIGTERM,
once it says it is up. Launched nodes must end with their command.
"""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Callable

import pytest
from cli_support import Console
from support import wait_until

from lmfleet.launch.process import free_port

UP = {
    "sim": (["sim", "--fast", "--port", "{port}"], r"lmfleet sim: \S+ on http://127\.0\.0\.1:\d+"),
    "serve": (["serve", "--port", "{port}"], r"lmfleet proxy on http://127\.0\.0\.1:\d+"),
    "launch": (
        ["launch", "m", "--simulate", "--port", "{port}", "--health-interval", "0.2"],
        r"^\s*http://127\.0\.0\.1:(\d+)\s",  # the status table, once the node is ready
    ),
    "demo": (  # signalled in its first burst, with its nodes up
        ["demo", "--nodes", "2", "--requests", "20000"],
        r"^\s*http://127\.0\.0\.1:(\d+)\s",
    ),
}


def refuses(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("command", list(UP))
def test_interrupt_and_terminate_exit_quietly(
    command: str, console: Callable[..., Console]
) -> None:
    args, up = UP[command]
    copies = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        argv = [a.format(port=free_port()) for a in args]
        copies[signum] = console(*argv, env={"PYTHONUNBUFFERED": "1"})
    for signum, copy in copies.items():
        found = copy.wait_for(up, timeout=90)
        node_port = int(found.group(1)) if found.groups() else None
        status = copy.stop(signum)
        output = str(copy)
        assert status == 0, f"{signal.Signals(signum).name}: status {status}\n{output}"
        assert "Traceback" not in output, output
        assert not re.search(r"\bERROR\b", output), output
        if node_port is not None:  # the launched node ended with the command
            wait_until(lambda port=node_port: refuses(port), timeout=10, what="node gone")
