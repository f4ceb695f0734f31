"""`--node URL[,NAME=VALUE...]`: one node and its own settings in one flag.

Olla configures each endpoint in one place; a flag per setting and node
(`--node-priority URL=N`, `--node-speed URL=S`) would make the reader match URLs
across lines. So each `--node` carries its node's settings (`NodeOptions`) after
the URL:

    --node http://gpu-a:23333 --node http://old-box:23333,priority=50,speed=0.5
    --node https://team-gw:443,key-env=TEAM_GW_KEY,header-env=X-Team:TEAM_ID,health-path=/ping
    --node http://gpu-b:8000,engine=vllm

Secrets are given only as environment variables (`key-env`, `header-env`): a value
on the command line is visible to every user of the machine (`ps`). A URL has no
comma in practice; one that does is not a node URL lmfleet accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pydantic

from lmfleet.cli.failure import validation_summary
from lmfleet.config import NodeOptions
from lmfleet.plain_errors import ConfigError

NODE_SETTINGS = {
    "priority": "its tier: higher is preferred (default 0)",
    "speed": "its relative speed, LMDeploy's `speed` (2 = twice as fast)",
    "key-env": "the environment variable holding its own key",
    "header-env": "NAME:VARIABLE, a header sent to it with the value of VARIABLE (repeat)",
    "health-path": "the path probed for its health (any 200 is healthy)",
    "health-interval": "seconds between its probes",
    "health-timeout": "seconds one of its probes may take",
    "engine": "its engine: auto (default), lmdeploy, vllm, sglang or openai",
}
"""What may follow a node's URL, and what each means (the `--node` help shows them)."""

_REPEATABLE = frozenset({"header-env"})


@dataclass(frozen=True, slots=True)
class NodeFlag:
    """One `--node` flag: the URL and the settings after it, as written."""

    url: str
    settings: list[tuple[str, str]] = field(default_factory=list)

    def options(self) -> NodeOptions | None:
        """The node's `NodeOptions` (None: it has no setting); `ConfigError` for a bad value."""
        if not self.settings:
            return None
        fields: dict[str, object] = {}
        headers: dict[str, str] = {}
        for name, value in self.settings:
            if name == "header-env":
                header, sep, variable = value.partition(":")
                if not sep or not header.strip() or not variable.strip():
                    raise ConfigError(f"--node {self.url}: header-env must be NAME:VARIABLE")
                headers[header.strip()] = variable.strip()
            else:
                fields[{"key-env": "api_key_env"}.get(name, name.replace("-", "_"))] = value
        if headers:
            fields["headers_env"] = headers
        try:
            return NodeOptions(**fields)
        except pydantic.ValidationError as exc:
            summary = validation_summary(exc, spell=lambda name: name.replace("_", "-"))
            raise ConfigError(f"--node {self.url}: {summary}") from None


def parse_node_flag(text: str) -> NodeFlag:
    """`URL[,NAME=VALUE...]` -> `NodeFlag`; `ConfigError` naming an unknown or repeated
    setting, or one without a value."""
    url, *parts = (part.strip() for part in text.split(","))
    settings: list[tuple[str, str]] = []
    for part in parts:
        name, sep, value = part.partition("=")
        name = name.strip().lower().replace("_", "-")
        if not sep or not value.strip():
            raise ConfigError(f"--node {text}: {part!r} is not NAME=VALUE")
        if name not in NODE_SETTINGS:
            known = ", ".join(NODE_SETTINGS)
            raise ConfigError(f"--node {text}: unknown setting {name!r} (known: {known})")
        if name not in _REPEATABLE and any(name == seen for seen, _ in settings):
            raise ConfigError(f"--node {text}: {name} is given twice")
        settings.append((name, value.strip()))
    return NodeFlag(url, settings)
