"""The notebook side of `LMFleet`: batch helpers and rich display.

A mixin so that `fleet.py` stays about the fleet itself: every method is a thin
delegation to `batch.py` or `display.py`, and the sync batch methods run their
async twins in the fleet's loop (which is why they work inside Jupyter).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from lmfleet.notebook import batch, display
from lmfleet.notebook.batch import VersionAsk
from lmfleet.surface import FleetSurface

if TYPE_CHECKING:
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

    from lmfleet.notebook.batch import BatchResult


class NotebookMethods:
    """Mixed into `LMFleet`; `self` is used only through `FleetSurface` (its public part)."""

    def _open_fleet(self) -> FleetSurface:
        fleet = cast("FleetSurface", self)
        fleet.runtime.check_open()
        return fleet

    def chat_many(
        self,
        messages_list: Sequence[Sequence[ChatCompletionMessageParam]],
        *,
        model: str | None = None,
        concurrency: int = 64,
        retries: int = 2,
        progress: bool = True,
        weight_version: VersionAsk = None,
        **params: Any,
    ) -> BatchResult[ChatCompletion]:
        """Chat completions for every message list, in input order, never raising mid-batch.

        Runs in the fleet's loop (works inside Jupyter); failed items are retried
        `retries` times, then left as `ItemError`s (`result.errors`, `result.summary()`).
        `params` go to `chat.completions.create` (`max_tokens=...`, ...).
        `weight_version` keeps the whole batch on one weight version (a number, or
        "current": the newest a healthy node serves now), e.g. an RL rollout batch.
        """
        fleet = self._open_fleet()
        return batch.run_in_fleet(
            fleet,
            lambda: self.achat_many(
                messages_list,
                model=model,
                concurrency=concurrency,
                retries=retries,
                progress=progress,
                weight_version=weight_version,
                **params,
            ),
        )

    async def achat_many(
        self,
        messages_list: Sequence[Sequence[ChatCompletionMessageParam]],
        *,
        model: str | None = None,
        concurrency: int = 64,
        retries: int = 2,
        progress: bool = True,
        weight_version: VersionAsk = None,
        **params: Any,
    ) -> BatchResult[ChatCompletion]:
        """`chat_many` in the caller's event loop (`await fleet.achat_many(...)` in a cell)."""
        return await batch.achat_many(
            self._open_fleet(),
            messages_list,
            model=model,
            concurrency=concurrency,
            retries=retries,
            progress=progress,
            params=params,
            weight_version=weight_version,
        )

    def complete_many(
        self,
        prompts: Sequence[str],
        *,
        model: str | None = None,
        concurrency: int = 64,
        retries: int = 2,
        progress: bool = True,
        weight_version: VersionAsk = None,
        **params: Any,
    ) -> BatchResult[Completion]:
        """`chat_many` for plain prompts (`/v1/completions`)."""
        fleet = self._open_fleet()
        return batch.run_in_fleet(
            fleet,
            lambda: self.acomplete_many(
                prompts,
                model=model,
                concurrency=concurrency,
                retries=retries,
                progress=progress,
                weight_version=weight_version,
                **params,
            ),
        )

    async def acomplete_many(
        self,
        prompts: Sequence[str],
        *,
        model: str | None = None,
        concurrency: int = 64,
        retries: int = 2,
        progress: bool = True,
        weight_version: VersionAsk = None,
        **params: Any,
    ) -> BatchResult[Completion]:
        """`complete_many` in the caller's event loop."""
        return await batch.acomplete_many(
            self._open_fleet(),
            prompts,
            model=model,
            concurrency=concurrency,
            retries=retries,
            progress=progress,
            params=params,
            weight_version=weight_version,
        )

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """Jupyter: a live dashboard widget, with HTML and text fallbacks."""
        return display.mimebundle(cast("FleetSurface", self))

    def _repr_html_(self) -> str:
        return display.repr_html(cast("FleetSurface", self))
