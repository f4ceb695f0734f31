"""OpenAI-shaped error bodies as LMDeploy sends them: message, type, code, param, object."""

from __future__ import annotations

import json
from typing import Any


def error_body(
    message: str, *, code: int, type: str = "invalid_request_error", param: str | None = None
) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": type, "param": param, "code": code}


def error_bytes(
    message: str, *, code: int, type: str = "invalid_request_error", param: str | None = None
) -> bytes:
    return json.dumps(error_body(message, code=code, type=type, param=param)).encode()
