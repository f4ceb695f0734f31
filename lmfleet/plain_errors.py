"""lmfleet's errors that are not also openai's, and the checks for optional packages.

The whole tree, and where each error is raised, is `lmfleet.errors` (which exports
these too): they stand apart only so that a process which raises none of openai's
(a simulated node, option parsing) does not import openai, most of the time
`python -m lmfleet.sim` took to start.
"""

from __future__ import annotations

import importlib.util


class LMFleetError(Exception):
    """Base of every error raised by lmfleet."""


class ConfigError(LMFleetError, ValueError):
    """An option or argument is invalid."""


class UnknownNodeError(LMFleetError, LookupError):
    """The URL names no node of this fleet."""


class UnknownRequestError(LMFleetError, LookupError):
    """The request id names no request the fleet can abort now (ended, never seen, or
    not one the fleet follows: only `/generate` generations carry an engine session
    the fleet chose)."""


class NotReadyError(LMFleetError, TimeoutError):
    """Fewer nodes than required became healthy in time. The message leads with one
    line per node that is not ready and why (`http://h:1: unhealthy (... Connection
    refused)`), then the fleet's table."""


class LaunchError(LMFleetError, RuntimeError):
    """A launched node failed to start or exited; the message carries its log tail."""


class NodeCommandError(LMFleetError, RuntimeError):
    """A node answered an admin command (sleep, wakeup, ...) with an error."""


class EngineCapabilityError(NodeCommandError):
    """The node's engine cannot do what was asked, or not as it was started: never a
    silent no-op. `engine` names it ("vLLM"), `capability` what it lacks ("sleep"),
    `hint` how to start it so that it can, where one exists."""

    def __init__(self, engine: str, capability: str, *, node: str | None = None, hint: str = ""):
        self.engine, self.capability, self.node, self.hint = engine, capability, node, hint
        where = f" ({node})" if node else ""
        message = f"{engine}{where} cannot {capability}"
        super().__init__(f"{message}: {hint}" if hint else message)


class EventLoopError(LMFleetError, RuntimeError):
    """The fleet's background event loop did not start, or a blocking method was
    called from inside it (code running in the loop must await the async twin)."""


class UnknownObjectError(LMFleetError, LookupError):
    """No Batch API file or batch has that id (OpenAI's 404)."""


class UnfinishedItemError(LMFleetError, LookupError):
    """A journal has no answer for this item: the batch did not finish it."""


class RecordedItemError(LMFleetError, RuntimeError):
    """An item's error, as a journal recorded it (its text; the exception is gone)."""


class JournalMismatchError(ConfigError):
    """A batch journal records a different batch (other prompts or parameters) than
    the one asked to resume from it; the message says how to reuse or replace it."""


class BatchError(LMFleetError, RuntimeError):
    """`BatchResult.raise_for_errors`: at least one item failed; chained from the
    first item's error, and the message is the batch's summary."""


class WeightUpdateError(LMFleetError, RuntimeError):
    """A weight update could not be done: every node failed, or a phase came out of
    order. Nodes that failed are quarantined (asleep, out of routing) with their reason."""


class WeightUpdateUnsupportedError(WeightUpdateError):
    """The node cannot take weights online as started: the message names the flag
    (LMDeploy 0.18 loads pushed weights only with `--backend pytorch
    --distributed-executor-backend ray`)."""


# -- optional dependencies: checked where needed, with what to install ---------------

SERVE_MODULES = ("uvicorn", "prometheus_client")
"""What the `serve` extra installs for the code to import (uvloop and httptools are
optional speed-ups that uvicorn picks up when present)."""


def install_hint(extra: str) -> str:
    """How to install one of lmfleet's extras, in one line: every missing-extra message
    ends with it. lmfleet is not on PyPI yet, so a bare `pip install 'lmfleet[X]'` works
    only where lmfleet is already installed (from a wheel or a clone: pip then adds the
    extra's packages); in a clone, `pip install '.[X]'` installs both."""
    return (
        f"install lmfleet's {extra!r} extra (pip install 'lmfleet[{extra}]' where lmfleet"
        f" is already installed, or pip install '.[{extra}]' in a clone)"
    )


def require_serve(feature: str) -> None:
    """Raise `ConfigError` naming the extra when the HTTP-server packages are missing."""
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{feature} needs {', '.join(missing)}: {install_hint('serve')}")
