"""Which served names a requested model may go to: aliases and unification."""

from __future__ import annotations

import pytest

from lmfleet import LMFleet
from lmfleet.errors import ConfigError
from lmfleet.node.names import model_names, parse_alias_flag, parse_aliases

HUB = "internlm/internlm2_5-7b-chat"
LOCAL = "/data/models/internlm2_5-7b-chat"


def test_an_alias_stands_for_itself_and_its_names() -> None:
    names = model_names([HUB, LOCAL], {"i7": (HUB, LOCAL)}, unify=False)
    assert names.groups == {"i7": frozenset({"i7", HUB, LOCAL})}
    assert names.aliases == {"i7": (HUB, LOCAL)}


def test_unify_joins_directories_and_case_only() -> None:
    upper = "./weights/InternLM2_5-7B-Chat"
    names = model_names([HUB, LOCAL, upper, "qwen"], {}, unify=True)
    group = frozenset({HUB, LOCAL, upper})
    assert names.groups == {HUB: group, LOCAL: group, upper: group}
    assert names.ambiguous == ()


def test_unify_reports_two_organisations_and_joins_neither() -> None:
    names = model_names([HUB, "other/internlm2_5-7b-chat", LOCAL], {}, unify=True)
    assert names.groups == {}
    (why,) = names.ambiguous
    assert "different organisations (internlm, other)" in why and LOCAL in why


def test_an_alias_of_a_unified_name_takes_its_group() -> None:
    names = model_names([HUB, LOCAL], {"i7": (HUB,)}, unify=True)
    assert names.groups["i7"] == frozenset({"i7", HUB, LOCAL})


def test_bad_aliases_are_config_errors() -> None:
    assert parse_aliases({"a": "x"}) == {"a": ("x",)}
    assert parse_alias_flag("a=x, y") == ("a", ("x", "y"))
    for bad in ({"a": []}, {"": ["x"]}, {"a": [""]}, {"a": [3]}):
        with pytest.raises(ConfigError):
            parse_aliases(bad)  # type: ignore[arg-type]
    for text in ("a", "=x", "a="):
        with pytest.raises(ConfigError, match="NAME=REAL"):
            parse_alias_flag(text)
    with pytest.raises(ConfigError, match="must name one or more served models"):
        LMFleet.attach([], allow_empty=True, aliases={"a": []})
