"""Which GPUs this machine offers, and how nodes split them.

Discovery order: `CUDA_VISIBLE_DEVICES` when set (the user already chose), else
torch when it is installed (never imported otherwise: importing it costs
seconds and a CUDA context), else `nvidia-smi -L`. Ids are returned as strings
because `CUDA_VISIBLE_DEVICES` may hold UUIDs as well as indices.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from lmfleet.plain_errors import ConfigError

_SMI_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPU ids a child process may use, in order."""
    env = os.environ if environ is None else environ
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [part.strip() for part in listed.split(",") if part.strip()]
        # CUDA stops at the first invalid id ("-1" is the usual "no GPU").
        valid: list[str] = []
        for gpu in ids:
            if gpu.startswith("-"):
                break
            valid.append(gpu)
        return valid
    if importlib.util.find_spec("torch") is not None:
        return _torch_gpus()
    return _nvidia_smi_gpus(env)


def _torch_gpus() -> list[str]:
    import torch  # type: ignore[import-not-found, unused-ignore]

    return [str(i) for i in range(int(torch.cuda.device_count()))]


def _nvidia_smi_gpus(env: Mapping[str, str]) -> list[str]:
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return _SMI_LINE.findall(out)


def assign_gpus(per_node: Sequence[int], available: Sequence[str]) -> list[list[str]]:
    """One contiguous group of GPU ids per node; ConfigError before anything starts.

    Contiguous groups keep a tensor-parallel node on neighbouring devices, which
    on most machines share the fastest links.
    """
    need = sum(per_node)
    if need > len(available):
        shape = ", ".join(str(n) for n in per_node)
        raise ConfigError(
            f"{len(per_node)} node(s) need {need} GPU(s) ({shape}) but {len(available)} "
            f"visible: {list(available) or 'none'} (CUDA_VISIBLE_DEVICES, torch or nvidia-smi)"
        )
    groups: list[list[str]] = []
    start = 0
    for count in per_node:
        groups.append(list(available[start : start + count]))
        start += count
    return groups
