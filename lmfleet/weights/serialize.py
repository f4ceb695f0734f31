"""`serialize(state_dict)`: a trainer's tensors as the string `/update_weights` takes.

LMDeploy's own `lmdeploy.utils.serialize_state_dict` makes CUDA IPC handles, so the
node must run on the same host as the trainer (it maps the trainer's GPU memory;
nothing is copied over HTTP). It needs torch and lmdeploy, the `lmdeploy` extra:
without them the error says what to install rather than failing at import.
"""

from __future__ import annotations

import importlib
from typing import Any

from lmfleet.errors import ConfigError, install_hint


def serialize(state_dict: Any) -> str:
    """LMDeploy's serialization of `state_dict` (name -> tensor, or its flattened-bucket
    dict with `metadata`), for `fleet.update_weights(lambda node: [serialize(sd)], ...)`."""
    try:
        utils = importlib.import_module("lmdeploy.utils")
    except ImportError as exc:
        raise ConfigError(
            "lmfleet.weights.serialize needs LMDeploy and torch on the trainer's host: "
            f"{install_hint('lmdeploy')} ({exc})"
        ) from exc
    serialize_state_dict = getattr(utils, "serialize_state_dict", None)
    if serialize_state_dict is None:
        raise ConfigError(
            "this LMDeploy has no lmdeploy.utils.serialize_state_dict (0.18 has it): "
            "upgrade LMDeploy"
        )
    return str(serialize_state_dict(state_dict))
