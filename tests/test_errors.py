"""lmfleet.errors: the tree in its docstring is the class tree, and all of it is exported."""

from __future__ import annotations

import builtins
import inspect
import re
import sys
from pathlib import Path

import openai
import pytest

import lmfleet
from lmfleet import errors
from lmfleet import plain_errors as plain
from lmfleet.launch.process import ManagedProcess, wait_for_port
from lmfleet.runtime import FleetRuntime

_NODE = re.compile(r"^(?P<indent> *)(?:\+-- )?(?P<name>[A-Z]\w+)(?: \((?P<extra>[\w.]+)\))?")


def drawn_tree() -> dict[str, tuple[str | None, str | None]]:
    """Class name -> (drawn parent, name in parentheses), from the module docstring."""
    doc = errors.__doc__ or ""
    lines = doc.split("\n\n")[1].splitlines()
    tree: dict[str, tuple[str | None, str | None]] = {}
    stack: list[tuple[int, str]] = []
    for line in lines:
        match = _NODE.match(line)
        if match is None:
            assert re.match(r"[ |]{10,}\w", line), line  # a description's second line
            continue
        column = len(match["indent"])
        while stack and stack[-1][0] >= column:
            stack.pop()
        tree[match["name"]] = (stack[-1][1] if stack else None, match["extra"])
        stack.append((column, match["name"]))
    return tree


def defined_errors() -> dict[str, type[BaseException]]:
    """lmfleet's own errors, as `lmfleet.errors` exports them (the ones that are not
    openai's are defined in `lmfleet.plain_errors`)."""
    return {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ in (errors.__name__, plain.__name__)
    }


def resolve(dotted: str) -> type:
    if dotted.startswith("openai."):
        cls = getattr(openai, dotted.removeprefix("openai."))
    else:
        cls = getattr(builtins, dotted)
    assert isinstance(cls, type)
    return cls


def test_the_drawing_is_the_class_tree() -> None:
    tree = drawn_tree()
    classes = defined_errors()
    assert set(tree) == set(classes)
    for name, (parent, extra) in tree.items():
        bases = [classes[parent]] if parent else [Exception]
        if extra:
            bases.append(resolve(extra))
        assert classes[name].__bases__ == tuple(bases), name


def test_every_error_is_exported() -> None:
    for name, cls in defined_errors().items():
        assert name in lmfleet.__all__
        assert getattr(lmfleet, name) is cls


def test_runtime_errors_stay_runtime_errors() -> None:
    for cls in (errors.EventLoopError, errors.BatchError, errors.LaunchError):
        assert issubclass(cls, errors.LMFleetError)
        assert issubclass(cls, RuntimeError)


def test_blocking_call_from_the_loop_is_an_event_loop_error() -> None:
    runtime = FleetRuntime()
    try:

        async def nested() -> None:
            async def noop() -> None:
                return None

            runtime.run(noop)

        with pytest.raises(errors.EventLoopError, match="await it instead"):
            runtime.run(nested)
    finally:
        runtime.close()


def test_a_process_that_exits_before_its_port_is_a_launch_error(tmp_path: Path) -> None:
    proc = ManagedProcess([sys.executable, "-c", "print('bye')"], log_path=tmp_path / "log")
    proc.wait(timeout=10)
    with pytest.raises(errors.LaunchError, match=r"(?s)before opening port.*bye"):
        wait_for_port("127.0.0.1", 9, timeout=5, proc=proc)
