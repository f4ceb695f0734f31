"""`--node URL[,NAME=VALUE...]`: a node's own settings, checked before anything starts."""

from __future__ import annotations

import pytest

from lmfleet import LMFleet, NodeOptions
from lmfleet.cli.node_flag import parse_node_flag
from lmfleet.errors import ConfigError


def test_settings_become_node_options() -> None:
    flag = parse_node_flag(
        "http://a:1,priority=50,speed=0.5,key-env=K,header-env=X-A:VA,header-env=X-B:VB,"
        "health-path=/ping,health-interval=0.5,health-timeout=2"
    )
    assert flag.url == "http://a:1"
    assert flag.options() == NodeOptions(
        priority=50,
        speed=0.5,
        api_key_env="K",
        headers_env={"X-A": "VA", "X-B": "VB"},
        health_path="/ping",
        health_interval=0.5,
        health_timeout=2,
    )
    assert parse_node_flag("http://a:1").options() is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("http://a:1,speed=-1", "speed: Input should be greater than 0"),
        ("http://a:1,priority=high", "priority: Input should be a valid integer"),
        ("http://a:1,health-path=ping", "health-path: String should match pattern"),
        ("http://a:1,header-env=X-A", "header-env must be NAME:VARIABLE"),
        ("http://a:1,priority=1,priority=2", "priority is given twice"),
        ("http://a:1,speed", "'speed' is not NAME=VALUE"),
    ],
)
def test_bad_settings_are_config_errors(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_node_flag(text).options()


def test_a_missing_environment_variable_stops_attach_before_it_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_SUCH_NODE_KEY", raising=False)
    options = {"http://127.0.0.1:9": NodeOptions(api_key_env="NO_SUCH_NODE_KEY")}
    with pytest.raises(ConfigError, match="NO_SUCH_NODE_KEY is not set"):
        LMFleet.attach(["http://127.0.0.1:9"], node_options=options)
    with pytest.raises(ConfigError, match="node_options names URLs not attached"):
        LMFleet.attach(["http://127.0.0.1:9"], node_options={"http://127.0.0.1:8": {}})
    with pytest.raises(ConfigError, match=r"node_options for http://127\.0\.0\.1:9"):
        LMFleet.attach(["http://127.0.0.1:9"], node_options={"http://127.0.0.1:9": {"x": 1}})
