from __future__ import annotations

import subprocess
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


def test_core_install_imports_without_the_serve_extra() -> None:
    """`import lmfleet` and an attached fleet need none of the `serve` extra's packages."""
    code = (
        "import sys\n"
        "for name in ('uvicorn', 'prometheus_client', 'starlette', 'httptools', 'uvloop'):\n"
        "    sys.modules[name] = None\n"
        "import lmfleet\n"
        "with lmfleet.LMFleet.attach(['http://127.0.0.1:9']) as fleet:\n"
        "    print(len(fleet.nodes))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
