"""Typed options, passed explicitly. Nothing here reads the environment.

Each option is declared once, as a field of its model. A field with a command-line
flag says so in its type, `Annotated[float, Flag("--wait-for-node")]`: `lmfleet
serve`, `lmfleet launch` and `lmfleet sim` build the flag, its default and its help
from the field (`add_flags`), and read its value back (`given`).
A keyword shortcut of `LMFleet.attach/simulate/launch` is one line of `FleetKeywords`
(its name and type, as type checkers must see them), named after its field.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypedDict, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic.fields import FieldInfo

from lmfleet.node.names import parse_aliases
from lmfleet.plain_errors import ConfigError

ServingStrategy = Literal["Hybrid", "DistServe"]
"""LMDeploy's proxy `--serving-strategy` names (docs/distserve.md)."""

FieldPath = tuple[str, ...]
"""Where a field sits in an options model: `("routing", "wait_for_node")`."""

Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class Flag:
    """The command-line flag of an option field: `Annotated[type, Flag("--name")]`.

    The flag takes the field's type (choices from a `Literal`; a `bool` is a switch to
    the other value: `--disable-gdr` sets `with_gdr` False), its default, and as help
    `help` or else the field's description, stating the default: `{default}` in the
    text places "default X", else " (default X)" ends it. `absent` says what a flag
    left out means where the value alone says too little (None; a default a command
    sets itself), `{value}` standing for the field's default; such a flag passes
    nothing on when it is left out.

    `const` makes the flag a switch that sets the field to it (`--unhealthy` sets
    `health_fault` "unhealthy"); `choices` narrows the values the flag takes below
    the field's type; `parse` turns the flag's text into the value (default: the
    field's type; `str.lower` takes any case); `section` names the argument group
    of a flat model's flag (`add_flags(sections=...)`).
    """

    name: str
    aliases: tuple[str, ...] = ()
    help: str | None = None
    metavar: str | None = None
    absent: str | None = None
    const: object = None
    choices: tuple[object, ...] | None = None
    parse: Callable[[str], Any] | None = None
    section: str | None = None


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HealthOptions(_Options):
    """Active health checking (docs/guide/concepts.md: node states)."""

    interval: Annotated[float, Flag("--health-interval")] = Field(
        default=1.0,
        gt=0,
        description="seconds between probes of one node (and /metrics reads for least_load)",
    )
    jitter: float = Field(
        default=0.1, ge=0, le=1, description="fraction of interval added at random"
    )
    timeout: float = Field(default=1.0, gt=0, description="seconds one probe may take")
    unhealthy_after: int = Field(
        default=2, ge=1, description="consecutive failures before unhealthy"
    )
    telemetry: bool = Field(
        default=True,
        description="read healthy nodes' /metrics after their /health (their own load, "
        "for least_load and the status views)",
    )
    metrics_interval: float | None = Field(
        default=None,
        gt=0,
        description="seconds between /metrics reads of a node; None: every probe round "
        "when the strategy routes on node load (least_load), else every 10 s",
    )


DEFAULT_FIRST_BYTE_TIMEOUT = 300.0
"""Five minutes: a streamed answer's first byte is its first token, which even a very
long prompt queued on a busy node reaches well within it; a non-streamed answer's
first byte comes with its last token, so generations longer than this must stream
or raise it (docs/guide/failover.md)."""


DEFAULT_STALL_TIMEOUT = 10.0
"""Ten seconds without a token, once the first came, is a hung node: the longest gap a
healthy LMDeploy node leaves between two tokens of a running generation is a prefill
of other requests batched in between (seconds for a very long prompt), not more. The
first token keeps the generous `first_byte_timeout` (a long prompt's prefill)."""


class OutlierOptions(_Options):
    """Outlier ejection from answers, Envoy's model (docs/guide/failover.md).

    A node that keeps failing while `/health` stays green (an OOM loop, a wedged
    engine, bad weights) is taken out of routing for `base_ejection_time` times the
    number of times it has been ejected (capped), then re-admitted on probation: one
    success clears its record, one failure ejects it again at once.
    """

    enabled: bool = True
    consecutive_failures: int = Field(
        default=5, ge=1, description="failures in a row that eject a node"
    )
    error_rate: float = Field(
        default=0.5, gt=0, le=1, description="failure fraction over the window that ejects"
    )
    window: int = Field(default=20, ge=1, description="recent answers the error rate is over")
    min_requests: int = Field(
        default=10, ge=1, description="answers in the window before the rate may eject"
    )
    base_ejection_time: float = Field(default=30.0, gt=0, description="seconds, times ejections")
    max_ejection_time: float = Field(default=300.0, gt=0)
    max_ejection_percent: float = Field(
        default=50.0,
        ge=0,
        le=100,
        description="never eject more of the nodes than this; past it they keep routing "
        "(panic mode) rather than refuse everything",
    )


class RoutingOptions(_Options):
    """What the transports do when a node fails or none is eligible."""

    wait_for_node: Annotated[
        float,
        Flag("--wait-for-node", help="seconds a request waits for a healthy node before 503"),
    ] = Field(default=30.0, ge=0, description="seconds to wait for an eligible node")
    wake_on_demand: bool = Field(
        default=False, description="wake a sleeping node when none is eligible"
    )
    follow_generations: Annotated[
        bool,
        Flag(
            "--no-follow-generations",
            help="relay LMDeploy /generate as it comes, without following it token by "
            "token (cheaper; a cut generation is then not continued elsewhere)",
        ),
    ] = Field(
        default=True,
        description="follow every LMDeploy /generate token by token, to continue it "
        "elsewhere when its node stops early (docs/guide/continuation.md); False relays "
        "its bytes as any request's, which costs the proxy less (docs/benchmarks.md §7)",
    )
    admission_queue: Annotated[
        int,
        Flag(
            "--admission-queue",
            help="requests that may wait for a healthy node at once; one more gets 503 "
            "with Retry-After at once",
        ),
    ] = Field(
        default=1024,
        ge=0,
        description="requests that may wait for an eligible node at once (each up to "
        "wait_for_node); one more is refused at once: FleetBusyError, or 503 with "
        "Retry-After through the proxy",
    )
    max_attempts: int = Field(
        default=3, ge=1, description="nodes tried per request before giving up"
    )
    spill_margin: Annotated[
        float,
        Flag(
            "--spill-margin",
            help="with priority tiers: a lower tier takes a request only when its expected "
            "wait is this many times below the best tier's (inf: only when short of "
            "healthy nodes)",
        ),
    ] = Field(
        default=2.0,
        gt=1.0,
        description="with node priorities (tiers): a lower tier's node takes a request "
        "only when its expected wait is below the best tier's by this factor; inf spills "
        "by health alone (lmfleet/routing/tiers.py)",
    )
    retry_status: frozenset[int] = Field(
        default=frozenset({500, 502, 503, 504}),
        description="answers tried again on another node while nothing reached the caller",
    )
    first_byte_timeout: Annotated[
        float | None,
        Flag(
            "--first-byte-timeout",
            help="seconds a node may stay silent before its first byte, then the request "
            "fails over to another node",
        ),
    ] = Field(
        default=DEFAULT_FIRST_BYTE_TIMEOUT,
        gt=0,
        description="seconds a node may stay silent before its first response byte "
        "(then the attempt fails over); None: only the caller's timeout",
    )
    stall_timeout: Annotated[
        float | None,
        Flag(
            "--stall-timeout",
            help="seconds a node followed token by token (/generate) may stay silent "
            "after its first token, then the generation continues on another node",
        ),
    ] = Field(
        default=DEFAULT_STALL_TIMEOUT,
        gt=0,
        description="seconds a followed generation's node may stay silent between "
        "tokens (then it continues elsewhere); None: the first-byte bound only",
    )
    backoff: float = Field(
        default=0.05, ge=0, description="first pause between failover attempts (jittered)"
    )
    max_backoff: float = Field(default=1.0, ge=0)
    connect_timeout: float = Field(
        default=5.0, gt=0, description="seconds to open a connection to a node"
    )
    max_connections: Annotated[
        int,
        Flag(
            "--max-connections",
            help="open connections to the nodes at most (requests past it wait; {default})",
        ),
    ] = Field(
        default=1024,
        ge=1,
        description="connections open at once per transport, over all nodes (the proxy's "
        "upstream pool; each routed client's pool); further requests wait for a free one "
        "up to the pool timeout (httpx2.PoolTimeout, the proxy's upstream_timeout)",
    )


class DistServeOptions(_Options):
    """Prefill/decode disaggregation: how pairs are connected (LMDeploy's proxy flags).

    `lmdeploy serve proxy --migration-protocol/--link-type/--disable-gdr/--dummy-prefill`
    map onto `migration_protocol`, `link_type`, `with_gdr=not disable_gdr` and
    `dummy_prefill` (docs/distserve.md). LMDeploy 0.18's proxy parses `--disable-gdr`
    but always sends `with_gdr: true`; lmfleet sends what was asked.
    """

    migration_protocol: Annotated[
        Literal["RDMA", "NVLINK"],
        Flag(
            "--migration-protocol",
            help="KV cache migration protocol between prefill and decode nodes",
        ),
    ] = Field(
        default="RDMA",
        description="KV migration protocol, sent as LMDeploy's MigrationProtocol number "
        "(RDMA 2, NVLINK 3) in p2p_initialize, p2p_connect and migration_request",
    )
    link_type: Annotated[Literal["RoCE", "IB"], Flag("--link-type")] = Field(
        default="RoCE", description="RDMA link type"
    )
    with_gdr: Annotated[
        bool,
        Flag(
            "--disable-gdr",
            help="no GPU Direct RDMA (LMDeploy 0.18's proxy accepts this flag but ignores it)",
        ),
    ] = Field(default=True, description="GPU Direct RDMA (rdma_config.with_gdr)")
    dummy_prefill: Annotated[
        bool,
        Flag(
            "--dummy-prefill",
            help="profile decode alone: no prefill node is called, decode nodes get a dummy "
            "migration (LMDeploy's meaning)",
        ),
    ] = Field(
        default=False,
        description="for performance profiling: call no prefill node and connect no "
        "pair; decode nodes get a dummy migration_request (is_dummy_prefill) and "
        "generate without migrating a KV cache",
    )
    control_timeout: float = Field(
        default=10.0, gt=0, description="seconds for one /distserve/* control call"
    )


class NodeOptions(_Options):
    """One node's own settings (`attach(node_options={url: NodeOptions(...)})`,
    `add_node(url, options=...)`, `lmfleet serve --node URL,NAME=VALUE`): Olla's
    per-endpoint settings. Unset fields take the fleet's.

    Secrets are `SecretStr` (shown as `**********` in any repr) or, better, the name of
    the environment variable that holds them (`api_key_env`, `headers_env`): read when
    the node is added, and all a proxy's state file keeps of them, so a restarted
    proxy reads them again. Neither a secret nor a header's value appears in logs,
    `/nodes/status`, `print(fleet)` or the state file.
    """

    api_key: SecretStr | None = Field(
        default=None, description="the node's own key (Bearer), instead of the fleet's"
    )
    api_key_env: str | None = Field(
        default=None, description="the environment variable holding the node's key"
    )
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="extra headers sent to the node (values secret)"
    )
    headers_env: dict[str, str] = Field(
        default_factory=dict,
        description="extra headers sent to the node: name -> the environment variable "
        "holding its value",
    )
    health_path: str | None = Field(
        default=None,
        pattern=r"^/",
        description="the path probed for health instead of the engine's (/health); any "
        "200 answer is healthy",
    )
    health_interval: float | None = Field(
        default=None, gt=0, description="seconds between this node's probes"
    )
    health_timeout: float | None = Field(
        default=None, gt=0, description="seconds one probe (and one admin call) of it may take"
    )
    priority: int | None = Field(default=None, description="its tier: higher is preferred")
    speed: float | None = Field(default=None, gt=0, description="its relative speed")
    engine: Literal["auto", "lmdeploy", "vllm", "sglang", "openai"] | None = Field(
        default=None,
        description="its engine (default auto: recognised from its /v1/models); openai: "
        "any other OpenAI-compatible server, routing and health only",
    )

    def secrets(
        self, environ: Mapping[str, str] | None = None
    ) -> tuple[str | None, tuple[tuple[str, str], ...]]:
        """(the node's key or None, its extra headers), the environment variables read
        now (`os.environ` by default); `ConfigError` naming a variable that is not set."""
        env = os.environ if environ is None else environ

        def read(variable: str, what: str) -> str:
            value = env.get(variable)
            if not value:
                raise ConfigError(f"{what}: the environment variable {variable} is not set")
            return value

        key = self.api_key.get_secret_value() if self.api_key is not None else None
        if key is None and self.api_key_env:
            key = read(self.api_key_env, "api_key_env")
        headers = [(name, value.get_secret_value()) for name, value in self.headers.items()]
        headers += [
            (name, read(variable, f"headers_env[{name!r}]"))
            for name, variable in self.headers_env.items()
        ]
        return key, tuple(headers)

    def persisted(self) -> dict[str, Any]:
        """What a state file keeps: everything but the secrets' values (their
        environment variables are kept)."""
        return self.model_dump(exclude={"api_key", "headers"}, exclude_defaults=True)

    def shown(self) -> dict[str, Any]:
        """What `/nodes/status` shows: `persisted()`, plus the names of the headers
        given as values (never the values)."""
        shown = self.persisted()
        if self.headers:
            shown["headers"] = sorted(self.headers)
        if self.api_key is not None:
            shown["api_key"] = "**********"
        return shown


class FleetOptions(_Options):
    """Everything an `LMFleet` is configured with."""

    health: HealthOptions = HealthOptions()
    routing: RoutingOptions = RoutingOptions()
    outliers: OutlierOptions = OutlierOptions()
    serving_strategy: Annotated[
        ServingStrategy,
        Flag(
            "--serving-strategy",
            help="DistServe: prefill on Prefill-role nodes, decode on Decode-role nodes "
            "(nodes announce their role at /nodes/add; docs/distserve.md); {default}",
        ),
    ] = Field(
        default="Hybrid", description="Hybrid: one node per request; DistServe: prefill -> decode"
    )
    distserve: DistServeOptions = DistServeOptions()
    min_ready: Annotated[
        int,
        Flag(
            "--min-ready",
            help="healthy nodes /readiness waits for",
            absent="default {value}; lmfleet launch: every launched node",
        ),
    ] = Field(default=1, ge=1, description="healthy nodes that wait_ready waits for")
    drain_timeout: float = Field(
        default=30.0, ge=0, description="seconds to let in-flight requests end"
    )
    admin_timeout: float = Field(default=30.0, gt=0, description="seconds for sleep/wakeup calls")
    auto_sleep_after: Annotated[
        float | None,
        Flag(
            "--auto-sleep-after",
            help="put a node to sleep after this many seconds without requests; a request "
            "that finds every node asleep wakes one",
            absent="default: never",
        ),
    ] = Field(
        default=None,
        gt=0,
        description="put a node to sleep after this many seconds without requests "
        "(None: never); a request that finds no awake node wakes one (wake on demand)",
    )
    auto_sleep_level: Annotated[
        Literal[1, 2],
        Flag("--auto-sleep-level", help="LMDeploy sleep level for --auto-sleep-after"),
    ] = Field(default=1, description="LMDeploy sleep level")
    weight_version: Annotated[int, Flag("--weight-version")] = Field(
        default=0,
        description="the weight version nodes start with; weight updates record newer ones",
    )
    update_timeout: float = Field(
        default=600.0,
        gt=0,
        description="seconds one weight-update call to a node (a bucket, an NCCL step) may take",
    )
    aliases: Mapping[str, Sequence[str]] = Field(
        default_factory=dict,
        description="model aliases: a request for the alias goes to any node serving one of "
        "its names, under that node's own name (lmfleet/routing/aliases.py)",
    )
    unify_models: Annotated[
        bool,
        Flag(
            "--unify-models",
            help="served names that differ only by a directory or by case are one model "
            "(ambiguous ones are logged, never joined)",
        ),
    ] = Field(
        default=False,
        description="names that differ only by a path prefix or case are one model; "
        "ambiguous ones are reported, never joined (lmfleet/routing/aliases.py)",
    )

    @field_validator("aliases", mode="before")
    @classmethod
    def _check_aliases(cls, value: object) -> object:
        if value is None or not isinstance(value, Mapping):
            return value
        return parse_aliases(value)

    @property
    def wakes_on_demand(self) -> bool:
        """Whether a request that finds no awake node wakes a sleeping one: asked for
        (`routing.wake_on_demand`), or implied by auto-sleep (a fleet that sleeps by
        itself must wake on use)."""
        return self.routing.wake_on_demand or self.auto_sleep_after is not None


class FleetKeywords(TypedDict, total=False):
    """Keyword shortcuts for the most used `FleetOptions` fields.

    `LMFleet.attach`, `simulate` and `launch` accept them beside `options=`; each
    one given overrides its field of `options`. A shortcut is named after its field:
    the field's own name, or `section_name` (`health_interval`: `health.interval`).
    """

    health_interval: float
    """`health.interval`; also caps `health.timeout` at the interval (0.5 s minimum)."""
    unhealthy_after: int
    """`health.unhealthy_after`."""
    wait_for_node: float
    """`routing.wait_for_node`."""
    wake_on_demand: bool
    """`routing.wake_on_demand`."""
    first_byte_timeout: float
    """`routing.first_byte_timeout`."""
    min_ready: int
    """`min_ready` (launched fleets default it to their node count)."""
    serving_strategy: ServingStrategy
    """`serving_strategy`."""
    auto_sleep_after: float
    """`auto_sleep_after` (turns on `routing.wake_on_demand`)."""
    admission_queue: int
    """`routing.admission_queue`."""
    weight_version: int
    """`weight_version`: the version the nodes start with."""
    aliases: Mapping[str, Sequence[str]]
    """`aliases`: model alias -> the names nodes serve it under."""
    unify_models: bool
    """`unify_models`: names that differ only by a directory or by case are one model."""


def option_fields(model: type[BaseModel]) -> Iterator[tuple[FieldPath, FieldInfo]]:
    """Every field of `model` with its path; an option section's fields stand for it."""
    for name, field in model.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            yield from (((name, *path), leaf) for path, leaf in option_fields(section))
        else:
            yield (name,), field


def flag_of(field: FieldInfo) -> Flag | None:
    """The `Flag` a field declares, if any."""
    return next((meta for meta in field.metadata if isinstance(meta, Flag)), None)


def add_flags(
    group: argparse._ActionsContainer,
    model: type[BaseModel],
    *,
    sections: Mapping[str, argparse._ActionsContainer] | None = None,
) -> None:
    """The flags `model`'s fields declare (`Flag`), added to `group`; the flags of a
    section named in `sections` go to its own group there. A section is a nested
    options model (`distserve`) or the `Flag.section` a flag names.

    Each flag's dest is its field's path (`routing.wait_for_node`), read back by `given`.
    """
    for path, field in option_fields(model):
        flag = flag_of(field)
        if flag is not None:
            section = flag.section or (path[0] if len(path) > 1 else None)
            into = (sections or {}).get(section, group) if section else group
            into.add_argument(flag.name, *flag.aliases, **_argument(path, field, flag))


_METAVARS: dict[object, str] = {int: "N", float: "SECONDS"}


def _argument(path: FieldPath, field: FieldInfo, flag: Flag) -> dict[str, Any]:
    """`add_argument`'s keywords for the flag of the field at `path`."""
    kind = field.annotation
    if get_origin(kind) in (Union, UnionType):  # `float | None`: the flag gives a float
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    switch = kind is bool or flag.const is not None
    spec: dict[str, Any] = {"dest": ".".join(path), "help": _help(field, flag, switch)}
    if switch:  # to `const`, or a bool's other value; left out, it passes nothing on
        const = not field.default if flag.const is None else flag.const
        return {**spec, "action": "store_const", "const": const, "default": None}
    spec["default"] = None if flag.absent is not None else field.default
    choices = flag.choices or (get_args(kind) if get_origin(kind) is Literal else None)
    if choices:
        return {**spec, "choices": choices, "type": flag.parse or type(choices[0])}
    if get_origin(kind) is tuple:
        spec["nargs"] = "+"
        kind = get_args(kind)[0]
    if kind not in (int, float, str, Path):
        raise TypeError(f"{flag.name}: no command-line form for {field.annotation}")
    metavar = flag.metavar or _METAVARS.get(kind, path[-1].upper())
    return {**spec, "type": flag.parse or kind, "metavar": metavar}


def _help(field: FieldInfo, flag: Flag, switch: bool) -> str:
    """The flag's help, stating the default (a switch's is the other value)."""
    text = flag.help or field.description
    if not text:
        raise TypeError(f"{flag.name}: give its field a description or its Flag a help")
    if not switch:
        if flag.absent is None and field.default is None:
            raise TypeError(f"{flag.name}: say what leaving it out means (Flag.absent)")
        value = f"{field.default:g}" if isinstance(field.default, float) else str(field.default)
        phrase = (
            f"default {value}" if flag.absent is None else flag.absent.replace("{value}", value)
        )
        text = text.replace("{default}", phrase) if "{default}" in text else f"{text} ({phrase})"
    return text.replace("%", "%%")  # argparse formats help with %


def given(args: argparse.Namespace, model: type[BaseModel]) -> dict[FieldPath, Any]:
    """The values of `model`'s flags, by field path; a flag left out that passes
    nothing on (a switch, `Flag.absent`) is not among them."""
    values = {}
    for path, field in option_fields(model):
        value = getattr(args, ".".join(path), None) if flag_of(field) else None
        if value is not None:
            values[path] = value
    return values


def _shortcut_path(name: str) -> FieldPath:
    """The one `FleetOptions` field a `FleetKeywords` name is named after."""
    found = [path for path, _ in option_fields(FleetOptions) if name in (path[-1], "_".join(path))]
    if len(found) != 1:
        raise TypeError(f"FleetKeywords.{name} names {len(found)} FleetOptions fields, not one")
    return found[0]


SHORTCUTS: Mapping[str, FieldPath] = {
    name: _shortcut_path(name) for name in FleetKeywords.__annotations__
}
"""Each `FleetKeywords` name and the `FleetOptions` field it sets."""
SHORTCUT_NAMES = frozenset(SHORTCUTS)


def with_values(model: type[Model], base: Model | None, values: Mapping[FieldPath, Any]) -> Model:
    """`base` (or the defaults) with the fields at `values`' paths set; bad values are
    a `ConfigError`."""
    fields = (base or model()).model_dump()
    for (*path, leaf), value in values.items():
        section = fields
        for part in path:
            section = section[part]
        section[leaf] = value
    try:
        return model.model_validate(fields)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def merge_options(options: FleetOptions | None, shortcuts: Mapping[str, Any]) -> FleetOptions:
    """`options` (or the defaults) with the given keyword shortcuts applied; None skips one."""
    given = {name: value for name, value in shortcuts.items() if value is not None}
    unknown = sorted(set(given) - SHORTCUT_NAMES)
    if unknown:
        raise ConfigError(f"unknown keyword shortcut(s) {unknown}; config.FleetKeywords names them")
    values = {SHORTCUTS[name]: value for name, value in given.items()}
    base = options or FleetOptions()
    if "health_interval" in given:  # a probe never outlives its interval (0.5 s floor)
        values["health", "timeout"] = min(base.health.timeout, max(given["health_interval"], 0.5))
    if "auto_sleep_after" in given:
        values["routing", "wake_on_demand"] = True  # a sleeping fleet must wake on use
    return with_values(FleetOptions, base, values)
