"""Per-node settings over real sims, through both front doors: each node's own key and
headers reach it and no other (the sims record what they received), its own health
path and interval are what the monitor uses, and no secret shows anywhere."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx2
import pytest
from loadgen import Door, Report, load_through
from support import StartSim, sim_stats, wait_until

from lmfleet import LMFleet, NodeOptions, NodeStatus

KEY_A, KEY_B = "sk-node-a-0123456789", "sk-node-b-9876543210"
RED, BLUE = "team-red-secret", "team-blue-secret"
SECRETS = (KEY_A, KEY_B, RED, BLUE)
QUICK = ("--health-poll-interval", "0.2", "--ttft-ms", "5", "--tpot-ms", "2")


def load(fleet: LMFleet, door: Door, **kwargs: object) -> Report:
    return load_through(fleet, door, timeout=20.0, **kwargs)


def test_each_node_gets_its_own_key_and_headers_and_no_secret_shows(
    start_sim: StartSim,
    door: Door,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("NODE_A_KEY", KEY_A)
    monkeypatch.setenv("TEAM_B", BLUE)
    record = ("--record-headers", "X-Team")
    a = start_sim(*QUICK, "--api-keys", KEY_A, *record)
    b = start_sim(*QUICK, "--api-keys", KEY_B, *record)
    options = {
        a.url: NodeOptions(api_key_env="NODE_A_KEY", headers={"X-Team": RED}),
        b.url: {"api_key": KEY_B, "headers_env": {"X-Team": "TEAM_B"}},
    }
    state = tmp_path / "nodes.json"
    with caplog.at_level(logging.DEBUG, logger="lmfleet"):
        fleet = LMFleet.attach(
            [a.url, b.url], node_options=options, health_interval=0.2, strategy="round_robin"
        )
        with fleet:
            fleet.wait_ready(timeout=30, min_ready=2)
            server = fleet.serve(port=0, state_file=state)
            report = load(fleet, door, total=12, concurrency=3)
            assert report.outcomes == {"ok": 12}  # a wrong key would be a 401
            seen_a = sim_stats(a.url, KEY_A)["headers"]["x-team"]
            seen_b = sim_stats(b.url, KEY_B)["headers"]["x-team"]
            assert set(seen_a) == {RED} and set(seen_b) == {BLUE}
            # Every request and probe carried them: at least the 6 requests each.
            assert seen_a[RED] >= 6 and seen_b[BLUE] >= 6
            statuses = httpx2.get(server.url + "/nodes/status", timeout=5).json()
            assert statuses[a.url]["settings"] == {
                "api_key_env": "NODE_A_KEY",
                "headers": ["X-Team"],
            }
            assert statuses[b.url]["settings"] == {
                "headers_env": {"X-Team": "TEAM_B"},
                "api_key": "**********",
            }
            shown = [
                repr(fleet),
                fleet.status().model_dump_json(),
                json.dumps(statuses),
                repr(fleet.registry.snapshot()),
                state.read_text(),
                "\n".join(r.getMessage() for r in caplog.records),
            ]
            kept = {n["url"]: n for n in json.loads(state.read_text())["nodes"]}
            assert kept[a.url]["options"] == {"api_key_env": "NODE_A_KEY"}
            assert kept[b.url]["options"] == {"headers_env": {"X-Team": "TEAM_B"}}
    for text in shown:
        for secret in SECRETS:
            assert secret not in text


def test_a_node_s_own_health_path_and_interval(start_sim: StartSim) -> None:
    fast, slow, wrong = (start_sim(*QUICK) for _ in range(3))
    options = {
        fast.url: NodeOptions(health_interval=0.1, health_path="/v1/models"),
        wrong.url: NodeOptions(health_path="/no-such-path", health_interval=0.1),
    }
    with LMFleet.attach(
        [fast.url, slow.url, wrong.url], node_options=options, health_interval=30
    ) as fleet:
        # The wrong path answers 404: unhealthy, with the reason; the others healthy.
        wait_until(
            lambda: {n.url: n.state for n in fleet.nodes},
            until=lambda states: (
                states[fast.url] is NodeStatus.HEALTHY
                and states[slow.url] is NodeStatus.HEALTHY
                and states[wrong.url] is NodeStatus.UNHEALTHY
            ),
            timeout=20,
        )
        assert "404" in {n.url: n.message for n in fleet.nodes}[wrong.url]
        # The fast node is probed every 0.1 s at its own path; the fleet's 30 s
        # interval leaves the others at their first probe.
        wait_until(lambda: sim_stats(fast.url)["by_path"].get("/v1/models", 0) >= 10, timeout=20)
        assert sim_stats(fast.url)["by_path"].get("/health", 0) == 0
        assert sim_stats(slow.url)["by_path"]["/health"] <= 2
