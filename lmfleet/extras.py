"""Optional dependencies, checked where they are needed with an error that says what to install."""

from __future__ import annotations

import importlib.util

from lmfleet.errors import ConfigError

SERVE_MODULES = ("uvicorn", "prometheus_client")
"""What the `serve` extra installs for the code to import (uvloop and httptools are
optional speed-ups that uvicorn picks up when present)."""


def require_serve(feature: str) -> None:
    """Raise `ConfigError` naming the extra when the HTTP-server packages are missing."""
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{feature} needs {', '.join(missing)}: pip install 'lmfleet[serve]'")
