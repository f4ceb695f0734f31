"""The local launcher end to end: real simulator processes through the GPU user's path."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import psutil
import pytest
from launch.helpers import FAST, alive, all_dead
from support import wait_until

from lmfleet import LMFleet, NodeStatus
from lmfleet.errors import LaunchError
from lmfleet.launch.command import SIM_COMMAND

MODEL = "internlm/internlm2_5-7b-chat"


def _chat(fleet: LMFleet, text: str = "hi") -> str:
    reply = fleet.client().chat.completions.create(
        model=fleet.model, messages=[{"role": "user", "content": text}], max_tokens=4
    )
    return str(reply.choices[0].message.content)


def test_nodes_start_in_parallel_log_and_serve() -> None:
    slow = ("--startup-delay", "1.5", "--log-level", "info", *FAST)
    with LMFleet.simulate(nodes=3, sim_args=slow, health_interval=0.2) as fleet:
        pids = [node.pid for node in fleet.processes.values()]
        # Every process runs before any node became healthy: they start at once.
        assert all(pid is not None and alive(pid) for pid in pids)
        assert all(n.state is NodeStatus.STARTING for n in fleet.nodes)
        fleet.wait_ready(timeout=30)
        assert _chat(fleet)
        url = fleet.nodes[0].url
        port = url.rsplit(":", 1)[1]
        wait_until(lambda: port in fleet.logs(url))
    assert all_dead(p for p in pids if p is not None)


def test_launch_with_a_command_template_and_server_args(tmp_path: Path) -> None:
    fleet = LMFleet.launch(
        MODEL,
        nodes=2,
        command=SIM_COMMAND,
        gpus_per_node=0,
        server_args={"ttft_ms": 5, "tpot-ms": 2, "health-poll-interval": 0.5, "fast": True},
        log_dir=tmp_path,
        health_interval=0.2,
    )
    with fleet:
        fleet.wait_ready(timeout=30)
        assert _chat(fleet)
        argv = psutil.Process(next(iter(fleet.processes.values())).pid).cmdline()
        assert argv[argv.index("--ttft-ms") + 1] == "5"
        assert "--fast" in argv
        assert len(list(tmp_path.glob("node-*.log"))) == 2


def test_each_node_gets_its_own_gpu_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    command = [*SIM_COMMAND, "--fast"]
    with LMFleet.launch(MODEL, nodes=2, tp=2, command=command, health_interval=0.2) as fleet:
        seen = sorted(
            psutil.Process(node.pid).environ()["CUDA_VISIBLE_DEVICES"]
            for node in fleet.processes.values()
        )
        assert seen == ["4,5", "6,7"]


def test_bad_flag_fails_wait_ready_with_the_log_tail() -> None:
    with (
        LMFleet.simulate(nodes=2, sim_args=("--no-such-flag",)) as fleet,
        pytest.raises(LaunchError) as caught,
    ):
        fleet.wait_ready(timeout=30)
    message = str(caught.value)
    assert "exited with status 2" in message
    assert "unrecognized arguments: --no-such-flag" in message


def test_port_in_use_fails_wait_ready_with_the_log_tail() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with (
            LMFleet.simulate(nodes=1, base_port=port, sim_args=FAST) as fleet,
            pytest.raises(LaunchError) as caught,
        ):
            fleet.wait_ready(timeout=30)
    message = str(caught.value).lower()
    assert f"127.0.0.1:{port}" in message
    assert "address already in use" in message


def test_close_after_an_exception_inside_with_leaves_no_process() -> None:
    pids: list[int] = []
    with (
        pytest.raises(RuntimeError, match="boom"),
        LMFleet.simulate(nodes=2, sim_args=FAST) as fleet,
    ):
        pids = [node.pid for node in fleet.processes.values() if node.pid]
        raise RuntimeError("boom")
    assert len(pids) == 2
    assert all_dead(pids, timeout=3)


def test_nodes_die_when_the_parent_is_sigkilled() -> None:
    script = textwrap.dedent(
        """
        import json, sys, time
        from lmfleet import LMFleet
        fleet = LMFleet.simulate(nodes=2, sim_args=["--fast"])
        print(json.dumps([n.pid for n in fleet.processes.values()]), flush=True)
        time.sleep(60)  # stay alive until the test SIGKILLs this parent
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert parent.stdout is not None
        pids = json.loads(parent.stdout.readline())
        assert len(pids) == 2 and all(alive(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=5)
        assert all_dead(pids, timeout=5)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_crashed_node_restarts_on_the_same_url() -> None:
    with LMFleet.simulate(
        nodes=1, sim_args=FAST, restart="on-failure", max_restarts=2, health_interval=0.2
    ) as fleet:
        fleet.wait_ready(timeout=30)
        ((url, node),) = fleet.processes.items()
        old_pid = node.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        # The exit message stands through the monitor's failed probes until the restart.
        wait_until(lambda: "exited with status -9" in fleet.nodes[0].message, timeout=10)
        assert fleet.nodes[0].state is NodeStatus.STARTING
        wait_until(lambda: fleet.nodes[0].state is NodeStatus.HEALTHY, timeout=30)
        assert fleet.nodes[0].url == url
        assert node.pid != old_pid and node.pid is not None and alive(node.pid)
        assert _chat(fleet)
        assert "restart 1" in fleet.logs(url)


def test_without_restart_a_crashed_node_stays_unhealthy() -> None:
    with LMFleet.simulate(nodes=1, sim_args=FAST, health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30)
        node = next(iter(fleet.processes.values()))
        assert node.pid is not None
        os.kill(node.pid, signal.SIGKILL)
        wait_until(lambda: fleet.nodes[0].state is NodeStatus.UNHEALTHY, timeout=10)
        with pytest.raises(AssertionError):
            wait_until(lambda: fleet.nodes[0].state is not NodeStatus.UNHEALTHY, timeout=1.5)
        # Seven failed probes later the process's exit still explains the state
        # (the monitor's "unreachable" used to overwrite it within one interval).
        assert "exited with status -9" in fleet.nodes[0].message


def test_cli_launch_serves_the_proxy_and_stops_its_nodes(tmp_path: Path) -> None:
    from lmfleet.launch.process import ManagedProcess, free_port, wait_for_port

    port = free_port()
    argv = [sys.executable, "-m", "lmfleet.cli", "launch", MODEL, "--simulate", "--nodes", "2"]
    argv.append("--weight-updates")  # nodes that take them (without: the proxy's 501)
    proc = ManagedProcess(
        [*argv, "--port", str(port), "--health-interval", "0.2"], log_path=tmp_path / "cli.log"
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.choices[0].message.content
        wait_until(  # the proxy answers once one node is up; the update takes those up
            lambda: httpx2.get(f"http://127.0.0.1:{port}/readiness", timeout=10).json(),
            until=lambda ready: ready["healthy_workers"] == 2,
        )
        update = httpx2.post(
            f"http://127.0.0.1:{port}/fleet/update_weights",
            json={"version": 1, "payload": "w"},
            timeout=60,
        )
        assert update.status_code == 200, update.text
        assert len(update.json()["updated"]) == 2
        nodes = [p.pid for p in psutil.Process(proc.pid).children() if "lmfleet.sim" in p.cmdline()]
        assert len(nodes) == 2
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert all_dead(nodes, timeout=5)
    finally:
        proc.terminate(grace=3)
