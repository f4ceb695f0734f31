from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmfleet import ConfigError, LMFleet
from lmfleet.errors import install_hint, require_serve

REPO = Path(__file__).resolve().parents[1]


def test_missing_serve_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    require_serve("anything")  # installed in the dev venv: no error
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ConfigError, match=r"lmfleet\[serve\]"):
        LMFleet.simulate(1)
    with LMFleet.attach([], allow_empty=True) as fleet, pytest.raises(ConfigError, match="uvicorn"):
        fleet.serve(port=0)


def test_every_missing_extra_names_the_extra_and_both_ways_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One wording (`install_hint`), one line, and no bare `pip install lmfleet`: lmfleet is
    not on PyPI, so the hint says to add the extra where lmfleet is installed or in a clone."""
    from lmfleet.launch.ray_launcher import _ray
    from lmfleet.notebook.batch import NO_TQDM_HINT
    from lmfleet.weights.serialize import serialize

    for extra in ("serve", "notebook", "ray", "lmdeploy"):
        hint = install_hint(extra)
        assert "\n" not in hint
        assert f"pip install 'lmfleet[{extra}]' where lmfleet is already installed" in hint
        assert f"pip install '.[{extra}]' in a clone" in hint
    assert NO_TQDM_HINT.endswith(install_hint("notebook"))
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError) as raised:
        _ray()
    assert str(raised.value).endswith(install_hint("ray"))
    monkeypatch.setitem(sys.modules, "lmdeploy", None)
    with pytest.raises(ConfigError) as raised:
        serialize({})
    assert install_hint("lmdeploy") in str(raised.value)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ConfigError) as raised:
        require_serve("lmfleet serve")
    assert str(raised.value) == f"lmfleet serve needs uvicorn: {install_hint('serve')}"


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


CORE = ("httpx2", "anyio", "pydantic", "openai", "tenacity")
SERVE_ONLY = ("uvicorn", "prometheus_client", "starlette", "tqdm", "ipywidgets", "ray")


def test_a_core_only_venv_runs_the_cli_and_names_the_extra(tmp_path: Path) -> None:
    """`pip install lmfleet` (no extras) in a fresh venv: `--help` works, `serve` names the extra.

    This venv's own versions constrain the install, so pip's cache serves it.
    """
    venv = tmp_path / "core"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(
        "\n".join(line for line in frozen.splitlines() if "==" in line and "lmfleet" not in line)
    )
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    done = subprocess.run(
        [*pip, "-c", str(constraints), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    python = str(venv / "bin" / "python")
    for name in CORE:
        assert subprocess.run([python, "-c", f"import {name}"], check=False).returncode == 0
    missing = subprocess.run(
        [
            python,
            "-c",
            f"import importlib.util as u; print([m for m in {SERVE_ONLY!r} if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert missing.stdout.strip() == "[]", "the core install pulled an extra"

    lmfleet = str(venv / "bin" / "lmfleet")
    helped = subprocess.run([lmfleet, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "serve" in helped.stdout
    for command in (["serve", "--port", "0"], ["sim"], ["demo"], ["launch", "m", "--simulate"]):
        done = subprocess.run([lmfleet, *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (command, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lmfleet: error: "), done.stderr
        assert lines[0].endswith(install_hint("serve")), lines[0]

    # The hint's first way, followed in that venv: pip adds the extra to the installed lmfleet.
    done = subprocess.run(
        [*pip, "-c", str(constraints), "lmfleet[serve]"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    code = "from lmfleet.errors import require_serve; require_serve('lmfleet serve')"
    assert subprocess.run([python, "-c", code], check=False, timeout=60).returncode == 0
