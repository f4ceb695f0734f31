"""`LaunchOptions`: where and how `LMFleet.launch` / `simulate` start their processes.

The fleet constructors take these as keywords (`LaunchKeywords`) beside the fleet
shortcuts, so one call reads `LMFleet.launch(model, 4, launcher="ray",
restart="on-failure", wait_for_node=60)` while the plumbing lives here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmfleet.config import SHORTCUT_NAMES, FieldPath, Flag, FleetKeywords, with_values
from lmfleet.launch.base import Placement, RestartMode, RestartPolicy

LauncherName = Literal["local", "ray"]


class LaunchOptions(BaseModel):
    """How a launched fleet's node processes are started and kept alive."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    launcher: Annotated[LauncherName, Flag("--launcher")] = Field(
        default="local", description="local processes or Ray actors"
    )
    restart: Annotated[RestartMode, Flag("--restart")] = Field(
        default="no", description="on-failure: bring a crashed node back on the same URL"
    )
    max_restarts: Annotated[
        int, Flag("--max-restarts", help="restarts per node with --restart on-failure")
    ] = Field(default=3, ge=0, description="restarts per node")
    base_port: Annotated[
        int | None,
        Flag(
            "--base-port",
            help="node i listens on PORT+i",
            metavar="PORT",
            absent="default: free ports",
        ),
    ] = Field(
        default=None, ge=1, le=65535, description="node i listens on base_port + i (None: free)"
    )
    log_dir: Path | None = Field(default=None, description="node logs (None: a temp dir)")
    ray_address: Annotated[
        str | None,
        Flag("--ray-address", help="Ray cluster to join", absent="default: start a local one"),
    ] = Field(default=None, description="Ray cluster (None: start a local one)")
    placement: Annotated[
        Placement, Flag("--placement", help="Ray: spread the nodes over machines or pack them")
    ] = Field(default="spread", description="Ray: spread or pack nodes")

    @property
    def policy(self) -> RestartPolicy:
        return RestartPolicy(self.restart, self.max_restarts)


class LaunchKeywords(FleetKeywords, total=False):
    """`LaunchOptions` fields and the fleet shortcuts, as `launch`/`simulate` keywords."""

    launcher: LauncherName
    restart: RestartMode
    max_restarts: int
    base_port: int | None
    log_dir: str | Path | None
    ray_address: str | None
    placement: Placement


LAUNCH_NAMES = frozenset(LaunchOptions.model_fields)


def split_keywords(
    keywords: Mapping[str, Any], caller: str, *, launch: bool
) -> tuple[dict[str, Any], LaunchOptions]:
    """Fleet shortcuts and launch options from one `**keywords`; a stray name is a TypeError.

    A TypeError, as Python raises for an unexpected keyword, because that is what
    the signature promises; bad values are `ConfigError`s.
    """
    allowed = SHORTCUT_NAMES | LAUNCH_NAMES if launch else SHORTCUT_NAMES
    for name in keywords:
        if name not in allowed:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
    shortcuts = {k: v for k, v in keywords.items() if k in SHORTCUT_NAMES}
    chosen: dict[FieldPath, Any] = {
        (k,): v for k, v in keywords.items() if k in LAUNCH_NAMES and v is not None
    }
    return shortcuts, with_values(LaunchOptions, None, chosen)
