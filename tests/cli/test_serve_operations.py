"""`lmfleet serve` as an operator runs it: probes for the orchestrator, and a log to read.

Nodes register themselves (`lmfleet sim --proxy-url`, as LMDeploy's api_server does)
with a proxy that is alive but not ready; readiness follows the healthy count;
a killed node shows in the log by URL; health probes never do.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from typing import Any

import httpx2
from cli_support import Console
from support import StartSim, wait_until

from lmfleet.launch.process import free_port

INTERVAL = 0.2


def probe(url: str, path: str) -> tuple[int, dict[str, Any]]:
    response = httpx2.get(url + path, timeout=5)
    return response.status_code, response.json()


def test_probes_and_log_lines_of_the_console_script(
    console: Callable[..., Console], start_sim: StartSim
) -> None:
    port = free_port()
    proxy = console(
        "serve",
        "--port", str(port),
        "--min-ready", "2",
        "--health-interval", str(INTERVAL),
        "--log-format", "json",
    )  # fmt: skip
    url = proxy.wait_for(r"lmfleet proxy on (http://\S+)").group(1)

    assert probe(url, "/liveness") == (200, {"status": "alive"})
    status, body = probe(url, "/readiness")
    assert (status, body["healthy_workers"], body["total_workers"]) == (503, 0, 0), body

    fast = ("--health-poll-interval", "0.2", "--fast", "--proxy-url", url)
    first = start_sim(*fast)
    status, body = wait_until(
        lambda: probe(url, "/readiness"), until=lambda r: r[1]["healthy_workers"] == 1
    )
    assert status == 503 and body["status"] == "not_ready", body
    second = start_sim(*fast)
    status, body = wait_until(lambda: probe(url, "/readiness"), until=lambda r: r[0] == 200)
    assert body["status"] == "ready" and body["healthy_workers"] == 2, body

    first.process.kill()  # seen within a few health intervals, by URL
    proxy.wait_for(rf'"node": "{re.escape(first.url)}".*"state": "unhealthy"', timeout=10)
    status, body = probe(url, "/readiness")
    assert status == 503 and body["healthy_workers"] == 1, body
    assert proxy.stop(signal.SIGTERM) == 0, proxy

    records = [json.loads(line) for line in proxy.lines if line.startswith("{")]
    assert records, proxy
    assert len(records) == len([line for line in proxy.lines if line.strip()]) - 1, (
        "every line but the start-up banner is one JSON record"
    )
    assert {"time", "level", "logger", "message"} <= set(records[0])
    # One line per change: each node added and healthy once; the dead one unhealthy once.
    changes = [(r.get("node"), r.get("state")) for r in records if "node" in r]
    for node in (first.url, second.url):
        assert changes.count((node, "healthy")) == 1, changes
    assert changes.count((first.url, "unhealthy")) == 1, changes
    # Nothing per probe: no HTTP client lines, no line about /health or /is_sleeping.
    for record in records:
        assert not record["logger"].startswith(("httpx", "httpcore")), record
        assert "/health" not in record["message"] and "is_sleeping" not in record["message"]
