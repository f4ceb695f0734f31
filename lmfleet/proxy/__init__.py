"""The fleet's HTTP front door: `fleet.serve()` / `lmfleet serve` (see docs/proxy.md)."""

from lmfleet.proxy.app import ProxyApp, create_app
from lmfleet.proxy.options import ProxyOptions
from lmfleet.proxy.server import ProxyServer, start_server

__all__ = ["ProxyApp", "ProxyOptions", "ProxyServer", "create_app", "start_server"]
