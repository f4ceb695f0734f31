"""The package as a user gets it, not as the editable install in `.venv` sees it.

`python -m build` makes the sdist and, from it, the wheel; the wheel goes into a fresh
venv, and `lmfleet --help` and the README's quickstart run from outside the repository
with the `lmfleet` that the wheel installed.

The test stays offline and takes a few seconds: it builds without isolation (hatchling
is in the `dev` extra), installs the wheel with `--no-deps` and lends the fresh venv this
venv's site-packages as a plain path in a `.pth` file. A plain path line puts the folder
on `sys.path` without processing the `.pth` files inside it, so the editable install's
`.pth` is never read and the repository stays off the path.

`make dist-check` (`python tests/test_dist.py dist/lmfleet-*.whl`) is the whole thing,
not part of `make test` as it needs the registry: the wheel with its `serve` extra in a
fresh venv, every dependency resolved by pip, then the same two checks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FROM = "lmfleet imported from: "
"""The line the quickstart run starts with, naming the `lmfleet` it imported."""


def readme_quickstart(nodes: int = 2) -> str:
    """The README's quickstart, word for word, with `nodes` simulated nodes."""
    section = (REPO / "README.md").read_text().split("\n## Quickstart\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code, found = re.subn(
        r"LMFleet\.simulate\(nodes=\d+\)", f"LMFleet.simulate(nodes={nodes})", code
    )
    assert found == 1, f"the README quickstart no longer calls LMFleet.simulate(nodes=N):\n{code}"
    return f"import lmfleet\nprint({FROM!r} + lmfleet.__file__, flush=True)\n{code}"


def package_files() -> set[str]:
    """Every file under lmfleet/ that a wheel must carry: modules and package data."""
    root = REPO / "lmfleet"
    return {
        path.relative_to(REPO).as_posix()
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def clean_env() -> dict[str, str]:
    """This environment without what would point Python back at this venv or the repo."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONSAFEPATH"):
        env.pop(name, None)
    return env


def run(argv: list[str], *, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


def make_venv(venv: Path, *, with_pip: bool) -> tuple[Path, Path]:
    """A fresh venv from this interpreter's base Python: (its python, its site-packages)."""
    argv = [sys.executable, "-m", "venv", str(venv)]
    done = run(argv if with_pip else [*argv, "--without-pip"], cwd=venv.parent)
    assert done.returncode == 0, done.stderr
    python = venv / "bin" / "python"
    purelib = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venv
    )
    assert purelib.returncode == 0, purelib.stderr
    return python, Path(purelib.stdout.strip())


def check_installed(venv: Path, cwd: Path) -> tuple[str, float, float]:
    """`lmfleet --help` and the README quickstart, run from `cwd` with the venv's lmfleet.
    Returns the quickstart's reply and how long each of the two took."""
    start = time.monotonic()
    helped = run([str(venv / "bin" / "lmfleet"), "--help"], cwd=cwd, timeout=60)
    help_s = time.monotonic() - start
    assert helped.returncode == 0, helped.stderr
    assert "usage: lmfleet" in helped.stdout and "serve" in helped.stdout, helped.stdout

    script = cwd / "quickstart.py"
    script.write_text(readme_quickstart(nodes=2))
    start = time.monotonic()
    done = run([str(venv / "bin" / "python"), str(script)], cwd=cwd, timeout=90)
    quickstart_s = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) >= 3 and lines[0].startswith(FROM), done.stdout + done.stderr
    imported = Path(lines[0][len(FROM) :]).resolve()
    assert imported.is_relative_to(venv.resolve()), f"lmfleet came from {imported}, not {venv}"
    assert not imported.is_relative_to(REPO), imported
    reply = lines[1].strip()
    assert reply, f"the quickstart printed no reply:\n{done.stdout}"
    assert any(line.startswith("LMFleet: ") for line in lines[2:]), done.stdout
    return reply, help_s, quickstart_s


def test_the_built_wheel_runs_the_cli_and_the_readme_quickstart(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    built = run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = out.glob("lmfleet-*-py3-none-any.whl")
    (sdist,) = out.glob("lmfleet-*.tar.gz")

    # Everything under lmfleet/ (py.typed, the sim's README, ...) is in both archives.
    wanted = package_files()
    assert "lmfleet/py.typed" in wanted
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = {name for name in archive.namelist() if name.startswith("lmfleet/")}
        entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        assert "lmfleet = lmfleet.cli:main" in archive.read(entry_points).decode()
    assert in_wheel == wanted
    with tarfile.open(sdist) as archive:
        top = sdist.name.removesuffix(".tar.gz")
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert wanted | {"README.md", "pyproject.toml"} <= in_sdist, top

    venv = tmp_path / "fresh"
    python, site_packages = make_venv(venv, with_pip=False)
    installed = run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--disable-pip-version-check",
            str(wheel),
        ],
        cwd=tmp_path,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    # This venv's packages as a plain path: its editable lmfleet's .pth is not processed.
    (site_packages / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    check_installed(venv, outside)


def check_release(wheel: Path) -> None:
    """`make dist-check`: `pip install 'WHEEL[serve]'` into a fresh venv, dependencies from
    the registry, then the CLI and the quickstart from outside the repository."""
    with tempfile.TemporaryDirectory(prefix="lmfleet-dist-check-") as tmp:
        venv = Path(tmp) / "fresh"
        start = time.monotonic()
        python, _ = make_venv(venv, with_pip=True)
        venv_s = time.monotonic() - start
        start = time.monotonic()
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        installed = run([*pip, f"{wheel.resolve()}[serve]"], cwd=Path(tmp), timeout=600)
        install_s = time.monotonic() - start
        assert installed.returncode == 0, installed.stderr[-3000:]
        reply, help_s, quickstart_s = check_installed(venv, Path(tmp))
    print(
        f"{wheel.name}[serve] in a fresh venv: venv {venv_s:.1f} s, pip install {install_s:.1f} s, "
        f"lmfleet --help {help_s:.1f} s, README quickstart {quickstart_s:.1f} s "
        f"(replied {reply[:40]!r}...)"
    )


if __name__ == "__main__":
    wheels = [Path(arg) for arg in sys.argv[1:] if arg.endswith(".whl")]
    if len(wheels) != 1:
        sys.exit(f"usage: {sys.argv[0]} dist/lmfleet-VERSION-py3-none-any.whl (got {sys.argv[1:]})")
    check_release(wheels[0])
