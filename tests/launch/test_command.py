"""Unit tests: server_args -> flags, command templates, GPU discovery and assignment."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from lmfleet import LMFleet
from lmfleet.errors import ConfigError
from lmfleet.launch.command import (
    LMDEPLOY_COMMAND,
    SIM_COMMAND,
    CommandContext,
    render_command,
    server_args_to_flags,
)
from lmfleet.launch.gpus import assign_gpus, visible_gpus
from lmfleet.launch.specs import server_specs


def test_server_args_to_flags() -> None:
    flags = server_args_to_flags(
        {
            "session-len": 8192,
            "cache_max_entry_count": 0.5,
            "enable-prefix-caching": True,
            "eager_mode": False,
            "model-name": None,
            "api-keys": ["a", "b"],
            "adapters": [],
            "--log-level": "INFO",
        }
    )
    assert flags == [
        "--session-len",
        "8192",
        "--cache-max-entry-count",
        "0.5",
        "--enable-prefix-caching",
        "--api-keys",
        "a",
        "b",
        "--log-level",
        "INFO",
    ]


def test_lmdeploy_template_renders_the_api_server_command() -> None:
    context = CommandContext(model="/m", host="127.0.0.1", port=23334, tp=2, backend="pytorch")
    argv = render_command(LMDEPLOY_COMMAND, context, server_args={"session_len": 4096})
    assert argv[0].endswith("lmdeploy")
    assert argv[1:] == [
        "serve",
        "api_server",
        "/m",
        "--server-name",
        "127.0.0.1",
        "--server-port",
        "23334",
        "--tp",
        "2",
        "--backend",
        "pytorch",
        "--session-len",
        "4096",
    ]


def test_sim_template_uses_this_interpreter() -> None:
    argv = render_command(SIM_COMMAND, CommandContext(model="m", host="h", port=1))
    assert argv[:3] == [sys.executable, "-m", "lmfleet.sim"]


def test_callable_template_and_extra_args() -> None:
    def vllm(ctx: CommandContext) -> list[str]:
        return ["/bin/vllm", "serve", ctx.model, "--port", str(ctx.port), "-tp", str(ctx.tp)]

    argv = render_command(
        vllm, CommandContext(model="m", host="h", port=9, tp=4), extra_args=("--x",)
    )
    assert argv == ["/bin/vllm", "serve", "m", "--port", "9", "-tp", "4", "--x"]


def test_unknown_placeholder_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="placeholders"):
        render_command(["srv", "{nope}"], CommandContext(model="m", host="h", port=1))


def test_specs_default_to_one_gpu_group_per_tp() -> None:
    specs = server_specs("m", 3, tp=2, base_port=9000)
    assert [(s.gpus, s.port, s.index) for s in specs] == [(2, 9000, 0), (2, 9001, 1), (2, 9002, 2)]
    with pytest.raises(ConfigError):
        server_specs("m", 0)


def test_visible_gpus_from_cuda_visible_devices() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3,5"}) == ["2", "3", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,2"}) == ["0"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-ab12,GPU-cd34"}) == ["GPU-ab12", "GPU-cd34"]


def _fake_smi(tmp_path: Path, output: str) -> str:
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'OUT'\n{output}OUT\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch") is not None,
    reason="torch is installed: it is asked before nvidia-smi",
)
def test_visible_gpus_from_nvidia_smi(tmp_path: Path) -> None:
    listing = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n"
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\n"
        "GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-3)\n"
    )
    path = _fake_smi(tmp_path, listing)
    assert visible_gpus({"PATH": path}) == ["0", "1", "2"]
    assert visible_gpus({"PATH": str(tmp_path / "empty")}) == []


def test_assign_gpus_contiguous_groups() -> None:
    assert assign_gpus([2, 2], ["0", "1", "2", "3"]) == [["0", "1"], ["2", "3"]]
    assert assign_gpus([0, 0], []) == [[], []]
    with pytest.raises(ConfigError, match="need 6 GPU"):
        assign_gpus([2, 2, 2], ["0", "1", "2", "3"])


def test_launch_without_enough_gpus_fails_before_starting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    marker = tmp_path / "started"
    command = ["/bin/sh", "-c", f"touch {marker}; sleep 30", "{port}"]
    with pytest.raises(ConfigError, match="need 4 GPU"):
        LMFleet.launch("m", nodes=2, tp=2, command=command, log_dir=tmp_path)
    with pytest.raises(ConfigError, match="need 3 GPU"):
        LMFleet.launch("m", nodes=3, tp=1, command=command, log_dir=tmp_path)
    assert not marker.exists()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
