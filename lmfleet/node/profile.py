"""`EngineProfile`: which route of a node's engine means what, named once per engine.

Everything lmfleet asks a node outside the routed requests themselves (is it
healthy, is it asleep, how loaded is it, which models does it serve, sleep, wake,
stop, load these weights) is a route whose path and parameters differ between
engines: LMDeploy says `/wakeup?tags=`, vLLM `/wake_up?tags=`, SGLang
`/resume_memory_occupation`. The node client (`node/client.py`) asks the profile
and never spells a path itself, so a new engine is a new profile, not an edit of
every caller. LMDeploy 0.18's api_server is the first and, today, only profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmfleet.node.load import METRICS_PATH

Params = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """The paths of one engine's control routes; None where the engine has no such route."""

    name: str
    health: str
    metrics: str
    models: str
    is_sleeping: str | None
    sleep: str
    wakeup: str
    wake_tags: tuple[str, ...]
    """The tags a full wakeup restores: a node woken with fewer still sleeps in part."""
    terminate: str | None
    update_weights: str | None
    weights_backend: str | None
    """A GET that names the engine backend that would load pushed weights."""
    abort: str | None
    """A POST that aborts one request or all of them (LMDeploy: 501 unless the server
    runs with `--enable-abort-handling`)."""

    def sleep_params(self, level: int) -> Params:
        return [("level", str(level))]

    def wake_params(self, tags: Sequence[str] | None) -> Params:
        return [("tags", t) for t in tags or ()]

    def abort_body(self, session_id: int | None) -> dict[str, object]:
        """The abort route's body: one session, or every request when None."""
        return {"abort_all": True} if session_id is None else {"session_id": session_id}

    def fully_awake(self, tags: Sequence[str] | None) -> bool:
        """Whether a wakeup with `tags` (None or empty: every tag) leaves nothing asleep."""
        return not tags or set(self.wake_tags) <= set(tags)


LMDEPLOY = EngineProfile(
    name="lmdeploy",
    health="/health",
    metrics=METRICS_PATH,
    models="/v1/models",
    is_sleeping="/is_sleeping",
    sleep="/sleep",
    wakeup="/wakeup",
    wake_tags=("weights", "kv_cache"),
    terminate="/terminate",
    update_weights="/update_weights",
    weights_backend="/update_weights_from_ipc",
    abort="/abort_request",
)
"""LMDeploy 0.18's `api_server` (read from `lmdeploy/serve/openai/api_server.py`)."""
