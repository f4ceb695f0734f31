"""Whose a Batch API file or batch is, so that one client key never sees another's.

With `lmfleet serve --api-keys` the proxy serves several callers, a team's, each with
its own key; OpenAI keeps an organisation's files and batches from every other's,
and a proxy for a team must too: a batch's input and output hold prompts and
answers. Each file and batch records its owner, a digest of the `Authorization`
value that made it (never the key itself, which the state directory must not hold),
and every route answers only its owner: another's object is "No such File object",
as an id that does not exist, so that ids reveal nothing.

Without client keys there is one caller as far as the proxy can tell: no owner is
recorded and every object is everyone's. So is an object made before keys were
set (it has no owner); and a key that changes leaves what it made to no one but a
proxy without keys.
"""

from __future__ import annotations

import hashlib
from typing import Any

OWNER = "owner"
"""The field of a stored object that names its owner (absent: everyone's)."""


def owner_of(authorization: bytes | None, keyed: bool) -> str | None:
    """The owner a request acts as: None where the proxy takes no client keys."""
    if not keyed or not authorization:
        return None
    return hashlib.sha256(authorization).hexdigest()[:32]


def visible(item: dict[str, Any], owner: str | None) -> bool:
    """Whether `owner` may see `item` (None sees all: no keys, or the proxy itself)."""
    return owner is None or item.get(OWNER) in (None, owner)


def shown(item: dict[str, Any]) -> dict[str, Any]:
    """The object as OpenAI's API has it: without its owner."""
    return {key: value for key, value in item.items() if key != OWNER}
