"""The fleet's HTTP front door: `fleet.serve()` / `lmfleet serve` (see docs/proxy.md).

Only the options load eagerly: the app and the server need the `serve` extra
(uvicorn, prometheus-client), and `import lmfleet` must work without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmfleet.proxy.options import ProxyOptions

if TYPE_CHECKING:
    from lmfleet.proxy.app import ProxyApp, create_app
    from lmfleet.proxy.server import ProxyServer, start_server

__all__ = ["ProxyApp", "ProxyOptions", "ProxyServer", "create_app", "start_server"]

_LAZY = {
    "ProxyApp": "lmfleet.proxy.app",
    "create_app": "lmfleet.proxy.app",
    "ProxyServer": "lmfleet.proxy.server",
    "start_server": "lmfleet.proxy.server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lmfleet.proxy' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
