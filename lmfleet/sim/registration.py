"""LMDeploy's self-registration with a proxy (`--proxy-url`).

LMDeploy posts once to `PROXY/nodes/add` during start-up, *before* its port is
open, logs a failure and goes on without retrying. We do the same, so a proxy
that probes a node back at once sees "connection refused" and must cope.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx2

from lmfleet.sim.options import SimOptions

log = logging.getLogger("lmfleet.sim")


def registration_body(options: SimOptions) -> dict[str, Any]:
    """The exact JSON LMDeploy sends: {"url", "status": {"models", "role"}}."""
    return {
        "url": f"http://{options.host}:{options.port}",
        "status": {"models": [options.model_name], "role": options.role_id},
    }


def register_with_proxy(options: SimOptions, timeout: float = 10.0) -> bool:
    """POST the registration once; True when the proxy answered 200."""
    assert options.proxy_url is not None
    url = options.proxy_url.rstrip("/") + "/nodes/add"
    try:
        response = httpx2.post(
            url,
            json=registration_body(options),
            headers={"accept": "application/json"},
            timeout=timeout,
        )
    except httpx2.HTTPError as exc:
        log.error("Service registration failed: %s", exc)
        return False
    if response.status_code != 200:
        log.error("Service registration failed: HTTP %d", response.status_code)
        return False
    return True
