"""`GET /v1/models` and `GET /v1/models/{name}`, answered by the fleet itself on both
front doors (a node's own list names only its models).

LMDeploy's api_server has no such route (it answers 405), so openai's
`client.models.retrieve(name)` cannot be sent to a node: the fleet's clients
(`Router.plan`) and the proxy (`proxy/admin_api.py`) answer it from the models the
fleet's nodes serve, with the card a node's own `GET /v1/models` lists for that
model, and a 404 in OpenAI's error shape, listing the served models, for any other
name: the 404 a request naming that model gets.
"""

from __future__ import annotations

import time

from lmfleet.node.state import NodeStatus
from lmfleet.registry import NodeRegistry

MODELS_PATH = "/v1/models"
"""The model list; `MODELS_PATH/{name}` is one model."""

OWNED_BY = "lmdeploy"
"""What LMDeploy's api_server puts in each card's `owned_by`."""


def model_card(name: str, created: int | None = None) -> dict[str, object]:
    """One model as OpenAI's `Model` object: `id`, `object`, `created`, `owned_by`,
    with the values an LMDeploy node lists for it (`created`: now, by default)."""
    return {
        "id": name,
        "object": "model",
        "created": int(time.time()) if created is None else created,
        "owned_by": OWNED_BY,
    }


ALIAS_OWNER = "lmfleet"
"""An alias card's `owned_by`: the fleet's name for models the nodes serve."""


def alias_card(alias: str, names: tuple[str, ...], created: int | None = None) -> dict[str, object]:
    """An alias as a model card: `alias_of` lists the names it stands for (OpenAI's
    `Model` allows more fields, and openai's client keeps them), `root` the first."""
    return {
        **model_card(alias, created),
        "owned_by": ALIAS_OWNER,
        "root": names[0],
        "parent": None,
        "permission": [],
        "alias_of": list(names),
    }


LISTED = frozenset({NodeStatus.HEALTHY, NodeStatus.EJECTED, NodeStatus.SLEEPING})
"""The nodes whose models `GET /v1/models` lists: up, if maybe not routable this
instant. A sleeping node wakes on demand or on command (an idle fleet that slept by
itself must not look as if it served nothing: a client that picks its model from the
list would find none), and an ejected one serves again after its probation."""


def model_list(registry: NodeRegistry) -> dict[str, object]:
    """`GET /v1/models` for the whole fleet: every model a node that is up serves
    (`LISTED`; not one quarantined by a failed weight update), in LMDeploy's list
    shape (its cards also carry `root`, `parent` and `permission`), then each alias
    such a node serves under one of its names (`alias_card`). A node's own list
    names only its models; the fleet's clients and the proxy answer this from the
    fleet so that a fleet serving several models lists them all."""
    names = sorted(
        {
            model
            for node in registry.snapshot()
            if node.status in LISTED and not node.quarantine
            for model in node.models
        }
    )
    now = int(time.time())
    cards = [
        {**model_card(name, now), "root": name, "parent": None, "permission": []} for name in names
    ]
    for alias, real in sorted(registry.names.aliases.items()):
        if alias not in names and not registry.names.groups[alias].isdisjoint(names):
            cards.append(alias_card(alias, real, now))
    return {"object": "list", "data": cards}


def card_for(registry: NodeRegistry, name: str) -> dict[str, object] | None:
    """`GET /v1/models/{name}`: the card of a model a node serves or of an alias;
    None for a name the fleet does not know (its 404: `unknown_model_message`)."""
    if name in registry.models():
        return model_card(name)
    real = registry.names.aliases.get(name)
    return alias_card(name, real) if real is not None else None


def model_named(path: str) -> str | None:
    """The model a `GET /v1/models/{name}` path asks for; None for any other path.

    `path` is already URL-decoded (httpx2's `URL.path`, ASGI's `path`): openai sends
    `internlm/internlm2_5-7b-chat` as `internlm%2Finternlm2_5-7b-chat`, and either
    spelling names the model."""
    prefix = MODELS_PATH + "/"
    if not path.startswith(prefix) or len(path) == len(prefix):
        return None
    return path[len(prefix) :]


def unknown_model_message(model: str, registry: NodeRegistry) -> str:
    """The 404's message for a model no node serves, naming those that are, and the
    aliases with what each stands for."""
    served = registry.models()
    message = (
        f"The model {model!r} does not exist; served models: {', '.join(served) or 'none yet'}"
    )
    aliases = registry.names.aliases
    if aliases:
        listed = "; ".join(f"{a} ({', '.join(n)})" for a, n in sorted(aliases.items()))
        message += f"; aliases: {listed}"
    return message
