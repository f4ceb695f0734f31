"""`lmfleet sim`'s flags: each one documented, and their defaults `SimOptions`' own."""

from __future__ import annotations

from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import pytest
from cli_support import group_of, help_gaps, subcommand_parser
from pydantic.fields import FieldInfo

from lmfleet.config import Flag, flag_of, option_fields
from lmfleet.errors import ConfigError
from lmfleet.sim.cli import options_from_args
from lmfleet.sim.options import SimOptions


def test_every_flag_has_help_that_states_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMDEPLOY_HEALTH_POLL_INTERVAL", raising=False)
    parser = subcommand_parser("sim")
    assert help_gaps(parser) == []
    # No flag given: exactly the model's defaults (the help reads the same ones).
    assert options_from_args(parser.parse_args([])) == SimOptions()


def flagged() -> list[tuple[str, FieldInfo, Flag]]:
    return [
        (path[0], field, flag)
        for path, field in option_fields(SimOptions)
        if (flag := flag_of(field))
    ]


def other_value(field: FieldInfo, flag: Flag) -> Any:
    """A value the flag takes other than its field's default (`float | None` -> a float)."""
    kind = field.annotation
    if get_origin(kind) in (Union, UnionType):
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    choices = flag.choices or (get_args(kind) if get_origin(kind) is Literal else ())
    if choices:
        return next(choice for choice in choices if choice != field.default)
    if get_origin(kind) is tuple:
        return ("k1", "k2")
    if flag.name == "--update-weights-error":
        return 503
    if kind is int:
        return (field.default or 0) + 2
    if kind is float:
        return min((field.default or 0.0) + 0.5, 1.0) if flag.name == "--error-rate" else 2.5
    assert kind is str, kind
    return "some-value"


def test_every_flag_is_its_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each flagged `SimOptions` field has its flag, and a value given reaches the field."""
    monkeypatch.delenv("LMDEPLOY_HEALTH_POLL_INTERVAL", raising=False)
    parser = subcommand_parser("sim")
    actions = {name: action for action in parser._actions for name in action.option_strings}
    for name, field, flag in flagged():
        assert actions[flag.name].option_strings == [flag.name, *flag.aliases]
        assert actions[flag.name].dest == name
        if actions[flag.name].nargs == 0:  # a switch
            argv, expected = [flag.name], actions[flag.name].const
        else:
            expected = other_value(field, flag)
            argv = [flag.name, *map(str, expected if isinstance(expected, tuple) else [expected])]
        built = options_from_args(parser.parse_args(argv))
        assert getattr(built, name) == expected != getattr(SimOptions(), name), argv


def test_the_flags_and_their_lmdeploy_spellings_stay() -> None:
    parser = subcommand_parser("sim")
    names = {name for action in parser._actions for name in action.option_strings}
    lmdeploy = {"--server-name", "--server-port", "--model-name", "--api-keys", "--proxy-url"}
    lmdeploy |= {"--allow-terminate-by-client", "--enable-abort-handling", "--enable-metrics"}
    lmdeploy |= {"--disable-metrics", "--log-level", "--backend", "--logprobs-mode"}
    lmdeploy |= {"--distributed-executor-backend"}
    sim = {"--host", "--port", "--model", "--served-model-name", "--role", "--fast", "--speed"}
    sim |= {"--ttft-ms", "--prefill-ms-per-token", "--tpot-ms", "--batch-slowdown"}
    sim |= {"--max-batch", "--prefix-cache-blocks", "--seed", "--weights-gb"}
    sim |= {"--update-seconds-per-gb", "--output-tokens", "--output-tokens-max"}
    sim |= {"--startup-delay", "--initializing-for", "--error-rate", "--error-status", "--hang"}
    sim |= {"--hang-after-head", "--hang-health", "--crash-after", "--drop-stream-after"}
    sim |= {"--stall-stream-after", "--record-headers"}
    sim |= {"--unhealthy", "--update-weights-error", "--health-poll-interval"}
    sim |= {
        "--engine",
        "--no-dev-mode",
        "--no-weights-cpu-backup",
    }  # whose surface: vLLM's and SGLang's too
    assert names == lmdeploy | sim | {"-h", "--help", "--debug"}


def test_the_flags_keep_their_groups() -> None:
    parser = subcommand_parser("sim")
    assert group_of(parser, "--host") == group_of(parser, "--help")
    assert group_of(parser, "--enable-metrics") == group_of(parser, "--help")
    for flag in ("--fast", "--speed", "--seed", "--output-tokens-max", "--update-seconds-per-gb"):
        assert group_of(parser, flag) == "cost model (ms on a speed-1 node)", flag
    for flag in ("--startup-delay", "--error-status", "--unhealthy", "--update-weights-error"):
        assert group_of(parser, flag) == "fault injection (also POST /sim/faults)", flag


def test_role_and_log_level_take_any_case() -> None:
    parser = subcommand_parser("sim")
    options = options_from_args(parser.parse_args(["--role", "Prefill", "--log-level", "DEBUG"]))
    assert (options.role, options.log_level) == ("prefill", "debug")


def test_metrics_switches() -> None:
    """`--enable-metrics` is accepted and changes nothing; `--disable-metrics` turns it off."""
    parser = subcommand_parser("sim")
    assert options_from_args(parser.parse_args(["--enable-metrics"])).enable_metrics
    for argv in (["--disable-metrics"], ["--disable-metrics", "--enable-metrics"]):
        assert not options_from_args(parser.parse_args(argv)).enable_metrics


def test_health_poll_interval_falls_back_to_lmdeploys_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = subcommand_parser("sim")
    monkeypatch.setenv("LMDEPLOY_HEALTH_POLL_INTERVAL", "5")
    assert options_from_args(parser.parse_args([])).health_poll_interval == 5
    argv = ["--health-poll-interval", "0"]
    assert options_from_args(parser.parse_args(argv)).health_poll_interval == 0
    monkeypatch.setenv("LMDEPLOY_HEALTH_POLL_INTERVAL", "soon")  # unreadable: the default
    assert options_from_args(parser.parse_args([])).health_poll_interval == 12


def test_error_status_flag_is_narrower_than_its_field(capsys: pytest.CaptureFixture[str]) -> None:
    """The flag takes LMDeploy-like 5xx statuses only; the model (and POST /sim/faults)
    keeps taking any status."""
    parser = subcommand_parser("sim")
    with pytest.raises(SystemExit):
        parser.parse_args(["--error-status", "501"])
    assert "invalid choice" in capsys.readouterr().err
    assert SimOptions(error_status=429).error_status == 429


def test_a_bad_value_is_a_config_error() -> None:
    parser = subcommand_parser("sim")
    with pytest.raises(ConfigError, match="speed"):
        options_from_args(parser.parse_args(["--speed", "0"]))
