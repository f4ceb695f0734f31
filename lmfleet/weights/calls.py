"""The weight-update calls to one LMDeploy node, and what their failures mean.

LMDeploy 0.18's `POST /update_weights` (an `UpdateParamsRequest`) loads pushed
weights only on the PyTorch engine with the Ray executor; every other executor
raises `NotImplementedError`, which reaches the caller as a bare HTTP 500. A weight
push is never retried here: a bucket half-applied and sent again could leave the
model inconsistent, so a failure is reported once, with the node, the call and
what to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmfleet.errors import WeightUpdateUnsupportedError
from lmfleet.node.client import NodeCallError, NodeClient
from lmfleet.node.state import NodeState

RAY_FLAG = "--distributed-executor-backend ray"
PYTORCH_FLAG = "--backend pytorch"
NEEDS = (
    "LMDeploy 0.18 loads pushed weights only on the PyTorch engine with the Ray executor: "
    "start the fleet with LMFleet.launch(..., weight_updates=True) (LMFleet.simulate "
    f"takes it too), or each api_server with {PYTORCH_FLAG} {RAY_FLAG}"
)
"""What to change, in Python and on the command line: said once per error."""


def unsupported(url: str, what: str) -> WeightUpdateUnsupportedError:
    """One node that cannot load pushed weights, `what` says why, and the fix."""
    return WeightUpdateUnsupportedError(f"{url} cannot load pushed weights: {what}. {NEEDS}.")


async def post_json(
    nodes: NodeClient,
    node: NodeState,
    path: str,
    body: Mapping[str, Any],
    timeout: float,
    *,
    verified: bool = False,
) -> Any:
    """POST `body` as JSON; the decoded answer. `NodeCallError` unless HTTP 200, and
    `WeightUpdateUnsupportedError` for the 501 of a backend without the route, and for
    a 500 on `/update_weights` from a node whose flags were not `verified`: what an
    executor without `update_params` answers (any crash answers the same bare 500, so
    on a node launched with the right flags it is an ordinary failure)."""
    profile = nodes.profile_of(node)
    try:
        return await nodes.call_json(node, "POST", path, json=body, timeout=timeout)
    except NodeCallError as exc:
        if profile.name != "lmdeploy" and exc.status in (404, 405):
            raise WeightUpdateUnsupportedError(
                f"{node.url} cannot load pushed weights: {profile.title} has no {path} "
                f"(HTTP {exc.status}); start it with {profile.needs}"
            ) from exc
        lmdeploy = profile.name == "lmdeploy"
        if lmdeploy and path == profile.update_weights and exc.status == 500 and not verified:
            raise unsupported(
                node.url,
                f"POST {path} answered HTTP 500 ({exc.text or 'no body'}), LMDeploy 0.18's "
                "answer when the executor cannot load weights",
            ) from exc
        if exc.status == 501:
            raise unsupported(node.url, f"POST {path} answered HTTP 501: {exc.text}") from exc
        raise
