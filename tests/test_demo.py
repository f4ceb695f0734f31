"""`lmfleet demo` (what `make demo` runs) end to end, as a real CLI process."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_routes_serves_and_moves_traffic_off_a_sleeping_node() -> None:
    # `python -m lmfleet` (the package's own __main__), as a notebook's `!` line runs it.
    result = subprocess.run(
        [sys.executable, "-m", "lmfleet", "demo", "--requests", "24", "--concurrency", "6"],
        capture_output=True,
        text=True,
        timeout=120,
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
