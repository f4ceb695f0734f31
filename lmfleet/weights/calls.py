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

import httpx2

from lmfleet.admin import JSON_HEADERS
from lmfleet.errors import NodeCommandError, WeightUpdateUnsupportedError
from lmfleet.state import NodeState

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
    client: httpx2.AsyncClient,
    node: NodeState,
    path: str,
    body: Mapping[str, Any],
    timeout: float,
    *,
    verified: bool = False,
) -> Any:
    """POST `body` as JSON; the decoded answer. `NodeCommandError` unless HTTP 200, and
    `WeightUpdateUnsupportedError` for the 501 of a backend without the route, and for
    a 500 on `/update_weights` from a node whose flags were not `verified`: what an
    executor without `update_params` answers (any crash answers the same bare 500, so
    on a node launched with the right flags it is an ordinary failure)."""
    headers = dict(JSON_HEADERS)
    if node.api_key:
        headers["Authorization"] = f"Bearer {node.api_key}"
    try:
        response = await client.post(node.url + path, json=body, headers=headers, timeout=timeout)
    except httpx2.HTTPError as exc:
        raise NodeCommandError(f"{node.url}{path} failed: {type(exc).__name__}: {exc}") from exc
    if response.status_code == 200:
        try:
            return response.json()
        except ValueError:
            return None
    text = response.text[:300]
    if path == "/update_weights" and response.status_code == 500 and not verified:
        raise unsupported(
            node.url,
            f"POST /update_weights answered HTTP 500 ({text or 'no body'}), LMDeploy 0.18's "
            "answer when the executor cannot load weights",
        )
    if response.status_code == 501:
        raise unsupported(node.url, f"POST {path} answered HTTP 501: {text}")
    raise NodeCommandError(f"{node.url}{path} answered HTTP {response.status_code}: {text}")


async def backend_of(client: httpx2.AsyncClient, node: NodeState, timeout: float) -> str | None:
    """The engine backend the node reports (`GET /update_weights_from_ipc`, LMDeploy
    0.18), or None where it reports none (an older server, an error)."""
    headers = {"Authorization": f"Bearer {node.api_key}"} if node.api_key else {}
    try:
        response = await client.get(
            node.url + "/update_weights_from_ipc", headers=headers, timeout=timeout
        )
        body = response.json()
    except (httpx2.HTTPError, ValueError):
        return None
    backend = body.get("backend") if isinstance(body, dict) else None
    return backend if isinstance(backend, str) else None
