"""`lmfleet demo` (what `make demo` runs) end to end, as a real CLI process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

NO_ONE = "http://127.0.0.1:9"
"""An HTTP proxy nobody runs: what a shell's `http_proxy` is to 127.0.0.1."""


def test_demo_routes_serves_and_moves_traffic_off_a_sleeping_node() -> None:
    # `python -m lmfleet` (the package's own __main__), as a notebook's `!` line runs it,
    # in a shell whose `http_proxy` does not exempt 127.0.0.1: nothing may go by it.
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    env.update(http_proxy=NO_ONE, HTTP_PROXY=NO_ONE, ALL_PROXY=NO_ONE)
    result = subprocess.run(
        [sys.executable, "-m", "lmfleet", "demo", "--requests", "24", "--concurrency", "6"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "24/24 requests" in out
    assert "12/12 requests through the proxy" in out
    asleep = re.search(r"while it sleeps:\n\s+\S+\s+sleeping\s+\+(\d+)", out)
    assert asleep is not None and asleep.group(1) == "0", out
    hole = re.search(r"succeed anyway .*\n(?:.*\n)*?\s+\S+\s+ejected\s+\+0 .*answered 500", out)
    assert "12/12 requests succeed anyway" in out and hole is not None, out
    assert "Proxy and all nodes stopped." in out
