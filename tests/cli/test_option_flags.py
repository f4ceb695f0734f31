"""Each option flag of `lmfleet serve`/`launch` is built from its field (`config.Flag`).

So an option with a flag is one edit, the field: its flag, the flag's default and
help, and the way its value reaches the options all come from there.
"""

from __future__ import annotations

import argparse
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
from cli_support import group_of, help_gaps, help_text, subcommand_parser
from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

from lmfleet.cli.serve import fleet_keywords, fleet_options, proxy_options
from lmfleet.config import (
    SHORTCUTS,
    FieldPath,
    Flag,
    FleetOptions,
    RoutingOptions,
    add_flags,
    flag_of,
    given,
    merge_options,
    option_fields,
    with_values,
)
from lmfleet.errors import ConfigError
from lmfleet.launch.options import LaunchOptions
from lmfleet.proxy.options import ProxyOptions

MODELS: dict[str, tuple[type[BaseModel], ...]] = {
    "serve": (ProxyOptions, FleetOptions),
    "launch": (ProxyOptions, FleetOptions, LaunchOptions),
}
"""The option models whose flags each command takes."""


def flagged(model: type[BaseModel]) -> list[tuple[FieldPath, FieldInfo, Flag]]:
    return [(path, field, flag) for path, field in option_fields(model) if (flag := flag_of(field))]


def value_type(field: FieldInfo) -> Any:
    """The field's type without its None (`float | None` -> float)."""
    kind = field.annotation
    if get_origin(kind) in (Union, UnionType):
        return next(arg for arg in get_args(kind) if arg is not type(None))
    return kind


def spelled(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def at(options: BaseModel, path: FieldPath) -> Any:
    for part in path:
        options = getattr(options, part)
    return options


def test_the_flagged_fields_are_the_ones_expected() -> None:
    """The LMDeploy flags among them stay, whatever else moves (test_serve_flags.py)."""
    names = {flag.name for model in MODELS["launch"] for _, _, flag in flagged(model)}
    lmdeploy = {"--server-name", "--server-port", "--serving-strategy", "--dummy-prefill"}
    lmdeploy |= {"--migration-protocol", "--link-type", "--disable-gdr"}
    assert lmdeploy <= names
    assert {"--wait-for-node", "--health-interval", "--min-ready", "--launcher"} <= names


@pytest.mark.parametrize("command", MODELS)
def test_every_flagged_field_has_its_flag_with_the_fields_default_and_help(command: str) -> None:
    parser = subcommand_parser(command)
    assert help_gaps(parser) == []
    actions = {name: action for action in parser._actions for name in action.option_strings}
    for model in MODELS[command]:
        for path, field, flag in flagged(model):
            action = actions[flag.name]
            assert action.option_strings == [flag.name, *flag.aliases]
            assert action.dest == ".".join(path)
            text = help_text(parser, flag.name)
            wording = (flag.help or field.description or "").split("{default}")[0]
            assert " ".join(wording.split()) in text, flag.name
            kind = value_type(field)
            if kind is bool:  # a switch to the field's other value
                assert (action.nargs, action.const, action.default) == (0, not field.default, None)
                continue
            if flag.absent is not None:  # left out, it passes nothing on, and says why
                assert action.default is None
                assert flag.absent.replace("{value}", spelled(field.default)) in text
            else:
                assert action.default == field.default
                assert f"default {spelled(field.default)}" in text, text
            if get_origin(kind) is Literal:
                assert tuple(action.choices or ()) == get_args(kind)


def other_value(field: FieldInfo) -> Any:
    """A valid value of the field other than its default."""
    kind, default = value_type(field), field.default
    if get_origin(kind) is Literal:
        return next(choice for choice in get_args(kind) if choice != default)
    if get_origin(kind) is tuple:
        return ("k1", "k2")
    if kind is int:  # `int | Literal["auto"]` defaulting to "auto" too
        return (default if isinstance(default, int) else 0) + 2
    if kind is float:
        return (default or 1.0) + 0.5
    assert kind is str, kind
    return "0.0.0.0" if default else "ray://head:10001"


@pytest.mark.parametrize("command", MODELS)
def test_every_flag_reaches_its_field(command: str) -> None:
    """A flag given on the command line is its field's value in the options the command
    builds (a shortcut's through `LMFleet`'s keyword, as `lmfleet serve` passes it)."""
    parser = subcommand_parser(command)
    model_arg = ["some/model"] if command == "launch" else []
    for model in MODELS[command]:
        for path, field, flag in flagged(model):
            if value_type(field) is bool:
                argv, expected = [flag.name], not field.default
            else:
                expected = other_value(field)
                values = expected if isinstance(expected, tuple) else (expected,)
                argv = [flag.name, *map(str, values)]
            args = parser.parse_args(model_arg + argv)
            if model is FleetOptions:
                built: BaseModel = merge_options(fleet_options(args), fleet_keywords(args))
            elif model is ProxyOptions:
                built = proxy_options(args)
            else:
                built = with_values(model, None, given(args, model))
            assert at(built, path) == expected, (argv, at(built, path))


def test_no_flag_builds_the_default_options() -> None:
    args = subcommand_parser("launch").parse_args(["some/model"])
    assert merge_options(fleet_options(args), fleet_keywords(args)) == FleetOptions()
    assert with_values(LaunchOptions, None, given(args, LaunchOptions)) == LaunchOptions()
    assert "min_ready" not in fleet_keywords(args)  # launched fleets wait for every node


def test_shortcut_flags_pass_as_keywords_and_the_rest_as_options() -> None:
    parser = subcommand_parser("serve")
    args = parser.parse_args(["--min-ready", "2", "--max-connections", "7", "--disable-gdr"])
    keywords = fleet_keywords(args)
    assert keywords["min_ready"] == 2 and set(keywords) <= set(SHORTCUTS)
    options = fleet_options(args)
    assert options.routing.max_connections == 7 and not options.distserve.with_gdr
    assert options.min_ready == FleetOptions().min_ready  # the keyword sets it, not options


class HedgedRouting(RoutingOptions):
    """A new routing option with a flag: the one edit, as it would be in `RoutingOptions`."""

    hedge_after: Annotated[float | None, Flag("--hedge-after", absent="default: never")] = Field(
        default=None, gt=0, description="seconds before a second node is asked too"
    )


class HedgedFleet(FleetOptions):
    routing: HedgedRouting = HedgedRouting()


def test_a_new_option_with_a_flag_is_one_edit() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, HedgedFleet)
    text = help_text(parser, "--hedge-after")
    assert text == "seconds before a second node is asked too (default: never)"

    def built(*argv: str) -> HedgedFleet:
        return with_values(HedgedFleet, None, given(parser.parse_args(argv), HedgedFleet))

    options = built("--hedge-after", "0.25", "--wait-for-node", "5")
    assert options.routing.hedge_after == 0.25 and options.routing.wait_for_node == 5
    assert built() == HedgedFleet()
    with pytest.raises(ConfigError, match="greater than 0"):
        built("--hedge-after", "0")


def test_a_flag_must_state_its_default() -> None:
    """A flag whose field defaults to None must say what leaving it out means."""

    class Unsaid(BaseModel):
        limit: Annotated[int | None, Flag("--limit")] = Field(default=None, description="a limit")

    with pytest.raises(TypeError, match=r"--limit: say what leaving it out means"):
        add_flags(argparse.ArgumentParser(), Unsaid)


class Knobs(BaseModel):
    """A flat model whose flags use `const`, `choices`, `parse` and `section`."""

    level: Annotated[Literal["low", "high"], Flag("--level", help="how loud", parse=str.lower)] = (
        "low"
    )
    status: Annotated[int, Flag("--status", help="status", choices=(500, 503), section="x")] = 500
    fault: Annotated[
        Literal["down", "slow"] | None, Flag("--down", help="be down", const="down", section="x")
    ] = None


def test_flag_const_choices_parse_and_section() -> None:
    parser = argparse.ArgumentParser()
    extra = parser.add_argument_group("extra")
    add_flags(parser, Knobs, sections={"x": extra})
    assert group_of(parser, "--status") == group_of(parser, "--down") == "extra"
    assert help_text(parser, "--status") == "status (default 500)"
    assert help_text(parser, "--down") == "be down"

    def built(*argv: str) -> Knobs:
        return with_values(Knobs, None, given(parser.parse_args(argv), Knobs))

    assert built() == Knobs()
    assert built("--level", "HIGH", "--status", "503", "--down") == Knobs(
        level="high", status=503, fault="down"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--status", "502"])
