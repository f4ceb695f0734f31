"""`--node URL[,NAME=VALUE...]`: one node and its own settings in one flag.

Olla configures each endpoint in one place; a flag per setting and node
(`--node-priority URL=N`, `--node-speed URL=S`) would make the reader match URLs
across lines. So each `--node` carries its node's settings after the URL:

    --node http://gpu-a:23333 --node http://old-box:23333,priority=50,speed=0.5

A URL has no comma in practice; one that does is not a node URL lmfleet accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmfleet.errors import ConfigError
from lmfleet.node.state import parse_speed
from lmfleet.routing.tiers import DEFAULT_PRIORITY, parse_priority

NODE_SETTINGS = {
    "priority": "its tier: higher is preferred (default 0)",
    "speed": "its relative speed, LMDeploy's `speed` (2 = twice as fast)",
}
"""What may follow a node's URL, and what each means (the `--node` help shows them)."""


@dataclass(frozen=True, slots=True)
class NodeFlag:
    """One `--node` flag: the URL and the settings after it, as written."""

    url: str
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def priority(self) -> int:
        given = self.settings.get("priority")
        return DEFAULT_PRIORITY if given is None else parse_priority(given, f"--node {self.url}")

    @property
    def speed(self) -> float | None:
        given = self.settings.get("speed")
        if given is None:
            return None
        try:
            return parse_speed(float(given), f"--node {self.url}")
        except ValueError:
            raise ConfigError(f"--node {self.url}: speed must be a number, got {given!r}") from None


def parse_node_flag(text: str) -> NodeFlag:
    """`URL[,NAME=VALUE...]` -> `NodeFlag`; `ConfigError` naming an unknown or repeated
    setting, or one without a value."""
    url, *parts = (part.strip() for part in text.split(","))
    settings: dict[str, str] = {}
    for part in parts:
        name, sep, value = part.partition("=")
        name = name.strip().lower().replace("_", "-")
        if not sep or not value.strip():
            raise ConfigError(f"--node {text}: {part!r} is not NAME=VALUE")
        if name not in NODE_SETTINGS:
            known = ", ".join(NODE_SETTINGS)
            raise ConfigError(f"--node {text}: unknown setting {name!r} (known: {known})")
        if name in settings:
            raise ConfigError(f"--node {text}: {name} is given twice")
        settings[name] = value.strip()
    return NodeFlag(url, settings)
