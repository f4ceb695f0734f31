"""The command line of one emulated node: the same process path a GPU node takes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

DEFAULT_SIM_MODEL = "internlm/internlm2_5-7b-chat"


def sim_command(
    port: int,
    *,
    model: str = DEFAULT_SIM_MODEL,
    speed: float = 1.0,
    host: str = "127.0.0.1",
    extra: Sequence[str] = (),
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lmfleet.sim",
        "--host",
        host,
        "--port",
        str(port),
        "--model",
        model,
        "--speed",
        repr(float(speed)),
        *extra,
    ]
