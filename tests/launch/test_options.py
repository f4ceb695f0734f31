"""Keyword plumbing of the fleet constructors: one typed model per concern."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest

from lmfleet import ConfigError, FleetOptions, LMFleet, RoutingOptions
from lmfleet.config import SHORTCUTS, FleetKeywords, merge_options, option_fields
from lmfleet.launch.options import LaunchKeywords, LaunchOptions, split_keywords
from lmfleet.proxy.options import ProxyOptions, serve_options


def test_shortcuts_override_options_and_none_keeps_them() -> None:
    base = FleetOptions(routing=RoutingOptions(wait_for_node=7.0, max_attempts=5))
    merged = merge_options(base, {"wait_for_node": 2.0, "health_interval": 0.2, "min_ready": None})
    assert merged.routing.wait_for_node == 2.0
    assert merged.routing.max_attempts == 5  # untouched fields survive
    assert merged.health.interval == 0.2
    assert merged.health.timeout == 0.5  # a probe never outlives its interval (0.5 s floor)
    assert merged.min_ready == base.min_ready
    with pytest.raises(ConfigError, match="greater than 0"):
        merge_options(None, {"health_interval": 0})
    with pytest.raises(ConfigError, match=r"unknown keyword shortcut.*'health_intervl'"):
        merge_options(None, {"health_intervl": 1.0})
    assert merge_options(None, {"auto_sleep_after": 5}).routing.wake_on_demand


def types_of(annotation: Any) -> set[Any]:
    """The types a union allows, None left out."""
    union = get_origin(annotation) in (Union, UnionType)
    return {t for t in (get_args(annotation) if union else (annotation,)) if t is not type(None)}


def test_every_shortcut_names_one_field_and_takes_its_type() -> None:
    """A shortcut is one line of `FleetKeywords`; its field is the one it is named after."""
    fields = dict(option_fields(FleetOptions))
    hints = get_type_hints(FleetKeywords)
    assert set(SHORTCUTS) == set(hints)
    source = inspect.getsource(FleetKeywords)
    for name, path in SHORTCUTS.items():
        assert name in (path[-1], "_".join(path))
        assert types_of(hints[name]) == types_of(fields[path].annotation), name
        # the API reference shows each keyword's docstring, which names its field
        assert re.search(rf"{name}: .*\n\s+\"\"\"`{'.'.join(path)}`", source), name


def test_launch_keywords_are_the_shortcuts_and_the_launch_options() -> None:
    hints = get_type_hints(LaunchKeywords)
    assert set(hints) == set(SHORTCUTS) | set(LaunchOptions.model_fields)
    for name, field in LaunchOptions.model_fields.items():
        assert types_of(field.annotation) <= types_of(hints[name]), name


def test_launch_keywords_split_into_their_models() -> None:
    shortcuts, launch = split_keywords(
        {"restart": "on-failure", "log_dir": "/tmp/x", "wait_for_node": 3.0},
        "LMFleet.launch",
        launch=True,
    )
    assert shortcuts == {"wait_for_node": 3.0}
    assert launch == LaunchOptions(restart="on-failure", log_dir=Path("/tmp/x"))
    assert launch.policy.mode == "on-failure" and launch.policy.max_restarts == 3
    with pytest.raises(TypeError, match="unexpected keyword argument 'lanucher'"):
        split_keywords({"lanucher": "ray"}, "LMFleet.launch", launch=True)
    with pytest.raises(TypeError, match="'launcher'"):
        split_keywords({"launcher": "ray"}, "LMFleet.attach", launch=False)
    with pytest.raises(ConfigError, match="restart"):
        split_keywords({"restart": "sometimes"}, "LMFleet.launch", launch=True)


def test_serve_keywords_override_proxy_options() -> None:
    base = ProxyOptions(port=9000, admin_keys=("a",))
    merged = serve_options(base, port=None, host="0.0.0.0", api_keys=["k"], state_file="s.json")
    assert merged.port == 9000 and merged.host == "0.0.0.0"
    assert merged.api_keys == ("k",) and merged.admin_keys == ("a",)
    assert merged.state_file == Path("s.json")
    with pytest.raises(TypeError, match="'api_key'"):
        serve_options(None, api_key="k")
    with pytest.raises(ConfigError):
        serve_options(None, port=70000)


def test_constructors_reject_stray_keywords_before_starting_anything() -> None:
    with pytest.raises(TypeError, match=r"LMFleet\.attach"):
        LMFleet.attach(["http://127.0.0.1:9"], health_intervl=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"LMFleet\.simulate"):
        LMFleet.simulate(1, lanucher="ray")  # type: ignore[call-arg]
    with LMFleet.attach("http://127.0.0.1:9", wait_for_node=1) as fleet:  # one URL as a str
        assert [n.url for n in fleet.nodes] == ["http://127.0.0.1:9"]
        assert fleet.options.routing.wait_for_node == 1
