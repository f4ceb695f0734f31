"""What the fleet checks before a weight update touches a node, and the typed error
when a node cannot load weights online (LMDeploy 0.18: PyTorch backend, Ray executor)."""

from __future__ import annotations

import importlib.util

import pytest
from support import StartSim, sim_stats

from lmfleet import LMFleet, NodeStatus
from lmfleet.errors import ConfigError, WeightUpdateUnsupportedError
from lmfleet.launch import specs
from lmfleet.weights import serialize
from lmfleet.weights.preflight import check_argv, tp_size

FIX = ("weight_updates=True", "--backend pytorch --distributed-executor-backend ray")
"""What the preflight error must name once: the Python fix and the server flags."""


def test_launched_without_the_flags_is_refused_before_any_node_is_touched() -> None:
    with LMFleet.simulate(nodes=2, sim_args=["--fast"], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        urls = [n.url for n in fleet.nodes]
        with pytest.raises(WeightUpdateUnsupportedError) as caught:
            fleet.update_weights("w", version=1)
        message = str(caught.value)
        # The fix once, in Python and as server flags, then each node and why.
        for fix in FIX:
            assert message.count(fix) == 1, message
        assert "LMFleet.launch(..., weight_updates=True)" in message
        head, _, nodes = message.partition("\n")
        assert "2 node(s) cannot load pushed weights" in head and "touched no node" in head
        why = "launched without --backend pytorch and --distributed-executor-backend ray"
        assert nodes.splitlines() == [f"  {url}: {why}" for url in urls]
        assert all(sim_stats(url)["admin_calls"] == [] for url in urls)  # none put to sleep
        assert all(n.state is NodeStatus.HEALTHY for n in fleet.nodes)
        # and the next update may start: the failed preflight released the nodes
        with pytest.raises(WeightUpdateUnsupportedError):
            fleet.update_weights("w", version=1)


def test_an_attached_turbomind_node_is_refused_from_what_it_reports(
    start_sim: StartSim,
) -> None:
    node = start_sim("--fast", "--backend", "turbomind")
    with LMFleet.attach([node.url], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        with pytest.raises(WeightUpdateUnsupportedError) as caught:
            fleet.update_weights("w", version=1)
        message = str(caught.value)
        assert message.endswith(f"\n  {node.url}: runs the turbomind backend"), message
        assert all(message.count(fix) == 1 for fix in FIX), message
        assert sim_stats(node.url)["admin_calls"] == []


def test_an_attached_node_without_ray_is_tried_and_its_500_becomes_the_typed_error(
    start_sim: StartSim,
) -> None:
    node = start_sim("--fast", "--backend", "pytorch")  # LMDeploy's default executor
    with LMFleet.attach([node.url], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        with pytest.raises(WeightUpdateUnsupportedError) as caught:
            fleet.update_weights("w", version=1)
        message = str(caught.value)
        assert "answered HTTP 500" in message and all(fix in message for fix in FIX), message
        state = fleet.nodes[0]
        assert state.state is NodeStatus.SLEEPING and "HTTP 500" in state.quarantine
        assert sim_stats(node.url)["weights"]["updates"] == 0


def test_launch_flags_and_their_contradictions() -> None:
    backend, args = specs.weight_update_server(None, {"session_len": 4096}, True)
    argv = specs.server_specs("m", 1, tp=2, backend=backend, server_args=args)[0].argv("h", 1)
    assert check_argv(argv) is None and tp_size(argv) == 2
    assert check_argv(specs.server_specs("m", 1)[0].argv("h", 1)) is not None
    with pytest.raises(ConfigError, match="backend='pytorch'"):
        specs.weight_update_server("turbomind", None, True)
    with pytest.raises(ConfigError, match="Ray executor"):
        specs.weight_update_server(None, {"distributed_executor_backend": "mp"}, True)


def test_serialize_says_what_to_install_without_lmdeploy() -> None:
    if importlib.util.find_spec("lmdeploy") is not None:
        pytest.skip("lmdeploy is installed here (never in the test venv)")
    with pytest.raises(ConfigError, match=r"lmfleet\[lmdeploy\]"):
        serialize({})
