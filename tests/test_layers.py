"""The package's import structure: no circles, and every import points down a layer.

docs/architecture.md draws these layers. Every import counts, including the ones
under `TYPE_CHECKING` and inside functions: a circle of type-only imports is still
a circle a reader has to untangle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lmfleet

PACKAGE = Path(lmfleet.__file__).parent

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "vocabulary",
        (
            "lmfleet.errors",
            "lmfleet.plain_errors",
            "lmfleet.answers",
            "lmfleet.config",
            "lmfleet.logs",
            "lmfleet.node.state",
            "lmfleet.node.load",
            "lmfleet.node.outliers",
            "lmfleet.node.views",
            "lmfleet.node.profile",
            "lmfleet.node.names",
            "lmfleet.priority",
            "lmfleet.monitor.judge",
        ),
    ),
    ("jobs", ("lmfleet.jobs",)),
    ("simulator", ("lmfleet.sim",)),
    ("wire", ("lmfleet.wire",)),
    ("loop", ("lmfleet.runtime", "lmfleet.sync", "lmfleet.doorbell")),
    ("routing", ("lmfleet.routing",)),
    ("registry", ("lmfleet.registry",)),
    ("node client", ("lmfleet.node", "lmfleet.node.client")),
    ("node I/O", ("lmfleet.node.admin", "lmfleet.monitor", "lmfleet.transport")),
    ("launchers and weights", ("lmfleet.launch", "lmfleet.weights")),
    ("surface", ("lmfleet.surface",)),
    ("front ends", ("lmfleet.proxy", "lmfleet.notebook")),
    ("fleet", ("lmfleet.fleet",)),
    ("applications", ("lmfleet.cli", "lmfleet.demo", "lmfleet")),
]
"""Bottom to top. A module may import its own layer and the ones below."""

UPWARD: set[tuple[str, str]] = set()
"""Known exceptions to "imports point down": none today; at most two may ever be.

The front ends (proxy, notebook) sit below the fleet: they see it only through
`surface.FleetSurface`, and the fleet imports them (it mixes the notebook methods
in and starts the proxy)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every lmfleet module `name` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lmfleet"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if not base.startswith("lmfleet"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) & known.keys() for name, path in known.items()}


def layer_of(name: str) -> int:
    best, rank = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank >= 0, f"{name} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return rank


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_circles() -> None:
    assert cycles(graph()) == []


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_imports_point_down() -> None:
    upward = {
        (name, target)
        for name, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(name)
    }
    assert upward == UPWARD
    assert len(UPWARD) <= 2


def test_the_simulator_stands_alone() -> None:
    """The emulated server shares only vocabulary with lmfleet, and nothing but the
    CLI imports it: the router is never tested against code it shares with the sim."""
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("lmfleet.sim"):
            outside = {t for t in targets if not t.startswith("lmfleet.sim")}
            assert all(layer_of(t) == 0 for t in outside), (name, outside)
        elif not name.startswith("lmfleet.cli"):
            assert not any(t.startswith("lmfleet.sim") for t in targets), name


def test_the_checker_sees_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# -- docs/architecture.md draws what is here ---------------------------------------------

ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def test_the_architecture_page_draws_every_layer() -> None:
    text = ARCHITECTURE.read_text()
    drawing = text[text.index("```") : text.index("imports point down, never up")]
    for layer, _ in LAYERS:
        first_word = layer.split()[0]
        assert f"│ {first_word}" in drawing, f"layer {layer!r} is not drawn in {ARCHITECTURE.name}"


def test_every_file_and_folder_the_architecture_page_names_exists() -> None:
    """Paths the page names (`proxy/forward.py`, `monitor/`, `runtime.py`) are relative
    to the package; a rename that forgets the page fails here."""
    text = ARCHITECTURE.read_text()
    names = set(
        re.findall(r"(?<![\w./-])((?:[a-z_]+/)*[a-z_0-9]+\.py|(?:[a-z_]+/)+)(?![\w])", text)
    )
    names -= {"docs/", "guide/", "tests/"}
    missing = sorted(
        n
        for n in names
        if not n.startswith(("docs/", "tests/"))
        and not (PACKAGE / n).exists()
        and not (PACKAGE.parent / n).exists()
    )
    assert missing == [], f"{ARCHITECTURE.name} names what does not exist: {missing}"
    assert len(names) > 30  # the page names the files it talks about
