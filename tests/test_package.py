"""The package's public names (lmfleet/__init__.py): each imported when first used, so
that `import lmfleet.sim` (a simulated node, in its own process) does not import the
fleet, nor openai (lmfleet/plain_errors.py). The names stand in three lists there
(the type checker's imports, `_HOME`, `__all__`): these tests hold them to one
another."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lmfleet

INIT = Path(lmfleet.__file__)


def _checked_imports() -> dict[str, str]:
    """name -> module, as the `if TYPE_CHECKING:` block imports them."""
    tree = ast.parse(INIT.read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If))
    return {
        alias.name: node.module or ""
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


def test_the_three_lists_name_the_same_things_from_the_same_modules() -> None:
    homes = lmfleet._HOME
    assert _checked_imports() == homes
    assert set(lmfleet.__all__) == {*homes, "__version__"}
    for name, module in homes.items():
        value = getattr(lmfleet, name)
        assert value is getattr(sys.modules[module], name), name
        assert name in dir(lmfleet)


@pytest.mark.parametrize(
    "entry",
    [
        "import lmfleet.sim.app, lmfleet.sim.cli",  # `python -m lmfleet.sim` (the launchers')
        # `lmfleet sim`: the parser of every subcommand is built first (it imported
        # the fleet and openai through `serve`'s and `demo`'s: 1.3 s to start, not 0.5)
        "from lmfleet.cli import build_parser; build_parser()",
    ],
)
def test_a_simulated_node_imports_neither_the_fleet_nor_openai(entry: str) -> None:
    probe = f"import sys; {entry}; print(sorted(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "'lmfleet.fleet'" not in loaded
    assert "'openai'" not in loaded  # lmfleet.plain_errors: ConfigError without openai's


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        lmfleet.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("lmfleet.NoSuchThing resolved")
