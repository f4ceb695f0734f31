"""The notebook side of `LMFleet`: batch helpers and rich display.

A mixin so that `fleet.py` stays about the fleet itself: every method is a thin
delegation to `batch.py` or `display.py`. The batch methods are written once, async;
the sync ones are those run in the fleet's loop (lmfleet/sync.py), which is why they
work inside Jupyter.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from lmfleet.jobs.journal import JournalMode
from lmfleet.notebook import batch, display
from lmfleet.notebook.batch import DEFAULT_MAX_CONCURRENCY, BatchOptions, VersionAsk
from lmfleet.surface import FleetSurface
from lmfleet.sync import blocking

if TYPE_CHECKING:
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

    from lmfleet.jobs.results import BatchResult
    from lmfleet.runtime import FleetRuntime


class NotebookMethods:
    """Mixed into `LMFleet`; `self` is used only through `FleetSurface` (its public part)."""

    runtime: FleetRuntime

    def _open_fleet(self) -> FleetSurface:
        fleet = cast("FleetSurface", self)
        fleet.runtime.check_open()
        return fleet

    async def achat_many(
        self,
        /,
        messages_list: Sequence[Sequence[ChatCompletionMessageParam] | str],
        *,
        model: str | None = None,
        concurrency: int | Literal["auto"] = 64,
        retries: int = 2,
        progress: bool = True,
        weight_version: VersionAsk = None,
        max_staleness: int | None = None,
        journal: str | os.PathLike[str] | None = None,
        journal_mode: JournalMode = "resume",
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        priority: int | None = None,
        **params: Any,
    ) -> BatchResult[ChatCompletion]:
        """Chat completions for every message list, in input order, never raising mid-batch.

        An item is a conversation (a list of messages) or a string, the user's one
        message; an item that is neither is a `ConfigError` before any request.

        `fleet.chat_many(...)` waits for the batch, run in the fleet's loop (so it
        works inside Jupyter; Ctrl-C cancels it); `await fleet.achat_many(...)` runs it
        in the caller's event loop. Failed items are retried `retries` times, then
        left as `ItemError`s (`result.errors`, `result.summary()`). `params` go to
        `chat.completions.create` (`max_tokens=...`, ...). `weight_version` keeps the
        whole batch on one weight version (a number, or "current": the newest a
        healthy node serves now), e.g. an RL rollout batch; `max_staleness=k` lets it
        run on any node within k versions of the newest in the fleet (asynchronous
        RL through a rolling update).

        `journal=PATH` records each item durably as it finishes (an SQLite file,
        `lmfleet.Journal`): the same call again with the same path returns the recorded
        answers without a request and asks only the rest, so a killed kernel or a
        Ctrl-C loses only the items in flight. A journal of another batch is refused
        (`JournalMismatchError`) unless `journal_mode="reuse"` (reuse its answers item
        by item) or `"overwrite"`.

        `concurrency="auto"` keeps as many requests in flight as the nodes run at once
        and no more: it grows while no node queues them and shrinks when a queue forms
        in their `/metrics` or a node answers 429/503 (jobs/adaptive.py), up to
        `max_concurrency`; an interactive client beside the batch is not left waiting
        behind a queue the batch filled.

        `priority` is every request's (lmfleet/priority.py): a batch at -1 waits in
        the fleet while the nodes' batches are full, so that interactive requests (at
        the default 0) beside it, from this fleet's clients or through its proxy, meet
        no queue of the batch's in the nodes.
        """
        options = BatchOptions(
            model,
            concurrency,
            retries,
            progress,
            weight_version,
            params,
            max_staleness,
            journal,
            journal_mode,
            max_concurrency,
            priority,
        )
        return await batch.run_requests(self._open_fleet(), batch.CHAT, messages_list, options)

    chat_many = blocking(achat_many)
    """`achat_many`, run in the fleet's loop and waited for (works inside Jupyter)."""

    async def acomplete_many(
        self,
        /,
        prompts: Sequence[str],
        *,
        model: str | None = None,
        concurrency: int | Literal["auto"] = 64,
        retries: int = 2,
        progress: bool = True,
        weight_version: VersionAsk = None,
        max_staleness: int | None = None,
        journal: str | os.PathLike[str] | None = None,
        journal_mode: JournalMode = "resume",
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        priority: int | None = None,
        **params: Any,
    ) -> BatchResult[Completion]:
        """`achat_many` for plain prompts (`/v1/completions`); `fleet.complete_many(...)`
        waits for it, as `chat_many` does."""
        options = BatchOptions(
            model,
            concurrency,
            retries,
            progress,
            weight_version,
            params,
            max_staleness,
            journal,
            journal_mode,
            max_concurrency,
            priority,
        )
        return await batch.run_requests(self._open_fleet(), batch.COMPLETIONS, prompts, options)

    complete_many = blocking(acomplete_many)
    """`acomplete_many`, run in the fleet's loop and waited for."""

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """Jupyter: a live dashboard widget, with HTML and text fallbacks."""
        return display.mimebundle(cast("FleetSurface", self))

    def _repr_html_(self) -> str:
        return display.repr_html(cast("FleetSurface", self))
