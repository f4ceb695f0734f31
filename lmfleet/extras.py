"""Optional dependencies, checked where they are needed with an error that says what to install."""

from __future__ import annotations

import importlib.util

from lmfleet.errors import ConfigError

SERVE_MODULES = ("uvicorn", "prometheus_client")
"""What the `serve` extra installs for the code to import (uvloop and httptools are
optional speed-ups that uvicorn picks up when present)."""


def install_hint(extra: str) -> str:
    """How to install one of lmfleet's extras, in one line: every missing-extra message
    ends with it. lmfleet is not on PyPI yet, so a bare `pip install 'lmfleet[X]'` works
    only where lmfleet is already installed (from a wheel or a clone: pip then adds the
    extra's packages); in a clone, `pip install '.[X]'` installs both."""
    return (
        f"install lmfleet's {extra!r} extra (pip install 'lmfleet[{extra}]' where lmfleet"
        f" is already installed, or pip install '.[{extra}]' in a clone)"
    )


def require_serve(feature: str) -> None:
    """Raise `ConfigError` naming the extra when the HTTP-server packages are missing."""
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{feature} needs {', '.join(missing)}: {install_hint('serve')}")
