"""Priority tiers over real sims, through both front doors (lmfleet/routing/tiers.py).

Tiers 100/100/50: the tier-50 node gets nothing under light load, everything when the
preferred nodes are asleep or dead, and under saturation exactly the requests the
load rule spills (counted by the fleet, served by the node: /sim/stats).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from loadgen import Door, Report, load_through
from support import SimNode, sim_served, wait_until

from lmfleet import LMFleet, NodeStatus

FleetOver = Callable[..., tuple[LMFleet, list[SimNode]]]
TIERS = [100, 100, 50]
SLOW = ("--tpot-ms", "20", "--output-tokens", "16")
"""A request takes ~0.35 s, so that 14 at once keep the preferred nodes busy."""


def load(fleet: LMFleet, door: Door, **kwargs: object) -> Report:
    return load_through(fleet, door, timeout=20.0, **kwargs)


def state_of(fleet: LMFleet, node: SimNode) -> NodeStatus:
    return {n.url: n.state for n in fleet.nodes}[node.url]


def test_the_lower_tier_gets_nothing_under_light_load(fleet_over: FleetOver, door: Door) -> None:
    fleet, nodes = fleet_over([(), (), ()], priorities=TIERS)
    report = load(fleet, door, total=24, concurrency=1)
    assert report.outcomes == {"ok": 24}
    assert [sim_served(n.url) for n in nodes][2] == 0
    assert sim_served(nodes[0].url) + sim_served(nodes[1].url) == 24
    assert fleet.registry.spills == {"health": 0, "load": 0}
    assert "tier" in repr(fleet) and " 50 " in repr(fleet)


def test_the_lower_tier_serves_all_when_the_preferred_sleep_or_die(
    fleet_over: FleetOver, door: Door
) -> None:
    fleet, nodes = fleet_over([(), (), ()], priorities=TIERS)
    fleet.sleep(nodes=[nodes[0].url])
    nodes[1].process.kill()
    wait_until(lambda: state_of(fleet, nodes[1]) is NodeStatus.UNHEALTHY, timeout=20)
    assert state_of(fleet, nodes[0]) is NodeStatus.SLEEPING
    report = load(fleet, door, total=12, concurrency=3)
    assert report.outcomes == {"ok": 12}
    assert sim_served(nodes[2].url) == 12
    assert fleet.registry.spills["health"] == 12
    note = fleet.explain().note
    assert "spilled by health to tier 50" in note and "tier 100: 0/2 healthy" in note


def test_saturation_spills_by_the_load_rule(fleet_over: FleetOver, door: Door) -> None:
    fleet, nodes = fleet_over([SLOW, SLOW, SLOW], priorities=TIERS)
    report = load(fleet, door, total=84, concurrency=14, stream_every=0)
    assert report.outcomes == {"ok": 84}
    served = [sim_served(n.url) for n in nodes]
    # Each request the tier-50 node served was one the rule spilled, and no other:
    # 14 at once over speed-1 nodes keep it to ~3 of 14 (docs/guide/strategies.md),
    # well under the third it gets without tiers.
    assert served[2] == fleet.registry.spills["load"], served
    assert 0 < served[2] < 84 * 0.3, served
    assert fleet.registry.spills["health"] == 0


def test_a_sleeping_better_tier_is_woken_while_the_lower_one_serves(
    fleet_over: FleetOver, door: Door
) -> None:
    """With wake on demand (or auto-sleep), a request that goes to tier 50 because
    tier 100 sleeps wakes a tier-100 node: idleness must not leave the traffic on a
    worse tier for good."""
    fleet, nodes = fleet_over([(), (), ()], priorities=TIERS, wake_on_demand=True)
    preferred = [nodes[0].url, nodes[1].url]
    fleet.sleep(nodes=preferred)
    report = load(fleet, door, total=4, concurrency=1)
    assert report.outcomes == {"ok": 4}
    assert sim_served(nodes[2].url) >= 1  # served at once, by the lower tier

    # One tier-100 node awake is half the tier: 30 % of the requests still spill
    # (Envoy's rule), and each spill past a sleeper asks for the next wake.
    def awake() -> set[str]:
        return {n.url for n in fleet.nodes if n.state is NodeStatus.HEALTHY}

    wait_until(lambda: awake() & set(preferred), timeout=20)
    deadline = time.monotonic() + 20
    while not set(preferred) <= awake() and time.monotonic() < deadline:
        # Traffic is what wakes them: each spill past a sleeper asks for a wake.
        assert load(fleet, door, total=2, concurrency=1).outcomes == {"ok": 2}
    assert set(preferred) <= awake()
    before = sim_served(nodes[2].url)
    assert load(fleet, door, total=6, concurrency=1).outcomes == {"ok": 6}
    assert sim_served(nodes[2].url) == before  # back on the preferred tier
