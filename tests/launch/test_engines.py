"""`launch(engine=...)`: each engine's command, flags and environment, and a real
launch through stand-ins for `vllm serve` and SGLang's launch_server that check
what they were given and then serve as `lmfleet sim --engine` (no GPU here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx2
import pytest
from support import sim_stats, wait_until

from lmfleet import LMFleet, NodeStatus
from lmfleet.errors import ConfigError
from lmfleet.launch.command import CommandContext, render_command
from lmfleet.launch.specs import server_specs

STAND_IN = """
import argparse, os, sys
parser = argparse.ArgumentParser()
for flag in {flags!r}:
    parser.add_argument(flag)
for switch in {switches!r}:
    parser.add_argument(switch, action="store_true")
args, rest = parser.parse_known_args(sys.argv[{skip}:])
missing = [s for s in {switches!r} if not getattr(args, s.strip("-").replace("-", "_"))]
dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE")
if missing or ({env_needed!r} and dev_mode != "1"):
    sys.exit(f"stand-in refused: missing {{missing}}, VLLM_SERVER_DEV_MODE={{dev_mode}}")
os.execv(sys.executable, [sys.executable, "-m", "lmfleet.sim", "--engine", {engine!r},
    "--host", args.host, "--port", args.port, "--model", {model}, "--fast"])
"""


def test_each_engines_command_and_environment() -> None:
    context = CommandContext(model="/m", host="127.0.0.1", port=8000, tp=2)
    (vllm,) = server_specs("/m", 1, tp=2, engine="vllm")
    assert render_command(vllm.command, context)[1:] == [
        "serve", "/m", "--host", "127.0.0.1", "--port", "8000",
        "--tensor-parallel-size", "2", "--enable-sleep-mode",
    ]  # fmt: skip
    assert vllm.env == {"VLLM_SERVER_DEV_MODE": "1"}
    (sglang,) = server_specs("/m", 1, tp=2, engine="sglang", env={"X": "1"})
    assert render_command(sglang.command, context) == [
        sys.executable, "-m", "sglang.launch_server", "--model-path", "/m",
        "--host", "127.0.0.1", "--port", "8000", "--tp-size", "2",
        "--enable-memory-saver", "--enable-weights-cpu-backup", "--enable-metrics",
    ]  # fmt: skip
    assert sglang.env == {"X": "1"}
    with pytest.raises(ConfigError, match="engine must be one of lmdeploy, vllm, sglang"):
        server_specs("/m", 1, engine="tgi")
    with pytest.raises(
        ConfigError, match="weight_updates=True picks LMDeploy's backend and executor"
    ):
        LMFleet.launch("/m", engine="vllm", weight_updates=True)
    with pytest.raises(ConfigError, match="backend='pytorch' is LMDeploy's"):
        LMFleet.launch("/m", engine="sglang", backend="pytorch")


def stand_ins(tmp_path: Path) -> Path:
    """`vllm` on PATH and `sglang.launch_server` on PYTHONPATH, each checking its flags."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    vllm = bin_dir / "vllm"
    vllm.write_text(
        f"#!{sys.executable}\n"
        + STAND_IN.format(
            flags=["--host", "--port", "--tensor-parallel-size"],
            switches=["--enable-sleep-mode"],
            skip=3,  # vllm serve MODEL
            env_needed=True,
            engine="vllm",
            model="sys.argv[2]",
        )
    )
    vllm.chmod(0o755)
    package = tmp_path / "py" / "sglang"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "launch_server.py").write_text(
        STAND_IN.format(
            flags=["--host", "--port", "--tp-size", "--model-path"],
            switches=["--enable-memory-saver", "--enable-weights-cpu-backup", "--enable-metrics"],
            skip=1,
            env_needed=False,
            engine="sglang",
            model="args.model_path",
        )
    )
    return tmp_path


def test_launch_starts_each_engine_able_to_sleep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = stand_ins(tmp_path)
    monkeypatch.setenv("PATH", f"{root / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", f"{root / 'py'}:{os.environ.get('PYTHONPATH', '')}")
    fleets = [
        LMFleet.launch(
            "org/m", engine=engine, gpus_per_node=0, log_dir=tmp_path / engine, health_interval=0.2
        )
        for engine in ("vllm", "sglang")
    ]
    try:
        for fleet, engine in zip(fleets, ("vllm", "sglang"), strict=True):
            fleet.wait_ready(timeout=60)
            (node,) = fleet.nodes
            assert (node.engine, node.launched) == (engine, True)
            fleet.sleep()
            assert sim_stats(node.url)["sleeping"]
            fleet.wakeup()
            assert fleet.nodes[0].state is NodeStatus.HEALTHY
    finally:
        urls = [f.nodes[0].url for f in fleets]
        for fleet in fleets:
            fleet.close()
    for url in urls:  # no orphan: the fleet's close ended each server
        wait_until(lambda url=url: not _answers(url), timeout=10)


def _answers(url: str) -> bool:
    try:
        sim_stats(url)
    except httpx2.HTTPError:
        return False
    return True
