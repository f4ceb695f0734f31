from __future__ import annotations

import sys

import pytest

from lmfleet import ConfigError, LMFleet
from lmfleet.extras import require_serve


def test_missing_serve_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    require_serve("anything")  # installed in the dev venv: no error
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ConfigError, match=r"lmfleet\[serve\]"):
        LMFleet.simulate(1)
    with LMFleet.attach([]) as fleet, pytest.raises(ConfigError, match="uvicorn"):
        fleet.serve(port=0)
