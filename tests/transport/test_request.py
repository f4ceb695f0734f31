"""The routed request's body: parsed once, by whichever reader needs it first.

The router, DistServe and the proxy all read it through `json_body`; a router that
needs the body (two models served) parses it once, and a second plan of the same
request (DistServe hands one request to the router for each phase) reuses it.
"""

from __future__ import annotations

import json

import httpx2

from lmfleet.config import RoutingOptions
from lmfleet.node.state import NodeStatus
from lmfleet.registry import NodeRegistry
from lmfleet.routing import resolve_strategy
from lmfleet.transport import Router
from lmfleet.transport.request import PARSED_BODY, json_body, parse_json

BODY = {"model": "b", "messages": [{"role": "user", "content": "hi"}]}


def two_model_router() -> Router:
    registry = NodeRegistry()
    for url, model in (("http://n1:1", "a"), ("http://n2:2", "b")):
        registry.add(url, models=(model,))
        registry.modify(url, lambda s: s.evolve(status=NodeStatus.HEALTHY))
    return Router(registry, resolve_strategy("round_robin"), RoutingOptions())


def test_the_body_is_parsed_once_and_kept_on_the_request() -> None:
    request = httpx2.Request("POST", "http://placeholder/v1/chat/completions", json=BODY)
    router = two_model_router()
    first = router.plan(request)
    assert first.info.model == "b"  # routing needed the body: two models are served
    parsed = request.extensions[PARSED_BODY]
    assert parsed == BODY
    router.plan(request)  # a second reader gets the same object, not a new parse
    assert json_body(request) is parsed


def test_the_one_served_model_needs_no_parse() -> None:
    registry = NodeRegistry()
    registry.add("http://n1:1", models=("b",))
    registry.modify("http://n1:1", lambda s: s.evolve(status=NodeStatus.HEALTHY))
    router = Router(registry, resolve_strategy("round_robin"), RoutingOptions())
    request = httpx2.Request("POST", "http://placeholder/v1/chat/completions", json=BODY)
    router.plan(request)
    assert PARSED_BODY not in request.extensions


def test_what_is_not_a_json_object_reads_as_none_once() -> None:
    for content in (b"[1, 2]", b"not json", b""):
        request = httpx2.Request("POST", "http://placeholder/v1/completions", content=content)
        assert json_body(request) is None
        assert json_body(request) is None
    assert parse_json(b"{")[1] is not None and parse_json(b"{")[1].startswith(
        "The request body is not valid JSON"
    )
    assert parse_json(json.dumps(BODY).encode()) == (BODY, None)
