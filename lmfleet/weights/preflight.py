"""Before a weight update touches any node: can each node take weights online?

The fleet checks what it can know without side effects: a launched node's own
command line, or the engine backend an attached server reports. A node that gives
no evidence is tried; if it then answers `/update_weights` with LMDeploy's
NotImplementedError 500, calls.py turns that into the same typed error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lmfleet.errors import WeightUpdateUnsupportedError
from lmfleet.weights.calls import NEEDS, PYTORCH_FLAG, RAY_FLAG


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of `--flag VALUE` or `--flag=VALUE` in `argv` (the last one wins)."""
    value = None
    for i, part in enumerate(argv):
        if part == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif part.startswith(flag + "="):
            value = part.split("=", 1)[1]
    return value


def check_argv(argv: Sequence[str]) -> str | None:
    """What a launched node's command line is missing for online weight loading
    (None: nothing)."""
    missing = []
    if flag_value(argv, "--backend") != "pytorch":
        missing.append(PYTORCH_FLAG)
    if flag_value(argv, "--distributed-executor-backend") != "ray":
        missing.append(RAY_FLAG)
    if not missing:
        return None
    return f"launched without {' and '.join(missing)}"


def check_backend(backend: str | None) -> str | None:
    """What an attached node's reported backend rules out (None: no evidence)."""
    if backend is None or backend == "pytorch":
        return None
    return f"runs the {backend} backend"


def preflight_error(reasons: Mapping[str, str]) -> WeightUpdateUnsupportedError:
    """One error for every node the preflight refused (`reasons`: URL -> why): the fix
    once (`weight_updates=True`, or the server flags), then each node and why."""
    nodes = "\n".join(f"  {url}: {why}" for url, why in reasons.items())
    return WeightUpdateUnsupportedError(
        f"{len(reasons)} node(s) cannot load pushed weights, so the update touched no "
        f"node. {NEEDS}. The node(s):\n{nodes}"
    )


def tp_size(argv: Sequence[str] | None) -> int:
    """A launched node's tensor-parallel size (LMDeploy `--tp N`, vLLM
    `--tensor-parallel-size N`, SGLang `--tp-size N`), 1 when not known."""
    value = None
    for flag in ("--tp", "--tensor-parallel-size", "--tp-size"):
        value = flag_value(argv or (), flag) or value
    try:
        return max(1, int(value)) if value is not None else 1
    except ValueError:
        return 1
